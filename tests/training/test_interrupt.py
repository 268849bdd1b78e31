"""SIGINT/SIGTERM: the first asks for a stop after the step, the second stops at once; handlers are restored."""

import os
import signal
import subprocess
import sys

import pytest

from lorakit.errors import EXIT_INTERRUPTED, Interrupted
from lorakit.training.interrupt import GracefulStop, outside_steps
from run_helpers import recipe_dict, sigint_as_from_a_terminal, subprocess_env, write_data, write_recipe


def test_first_signal_requests_a_stop_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop("lorakit train r.yaml --resume") as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        error = stop.stopped(12, "runs/x/checkpoints/step-000012")
        assert error.exit_code == EXIT_INTERRUPTED
        assert str(error) == ("SIGTERM: stopped after step 12, checkpoint runs/x/checkpoints/step-000012; "
                              "resume with: lorakit train r.yaml --resume")
        with pytest.raises(Interrupted, match="SIGINT again: stopped at once.*lorakit train r.yaml --resume"):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_ctrl_c_outside_the_steps_names_what_continues_the_run(tmp_path):
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(Interrupted, match="no checkpoint was written yet; start over with: lorakit train r.yaml "
                                          "--overwrite$"):
        with outside_steps(ckpts, "lorakit train r.yaml --resume"):
            raise KeyboardInterrupt
    for name in ("step-000003", "step-000012"):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "manifest.json").write_text("{}")
    (ckpts / "step-000015").mkdir()  # no manifest: an interrupted write is never continued from
    (ckpts / "step-000015.tmp").mkdir()
    (ckpts / "step-000015.tmp" / "manifest.json").write_text("{}")  # written, not yet renamed into place
    with pytest.raises(Interrupted, match=f"continue from {ckpts / 'step-000012'} with: lorakit train r.yaml --resume"):
        with outside_steps(ckpts, "lorakit train r.yaml --resume"):
            raise KeyboardInterrupt
    with pytest.raises(Interrupted, match="stopped after step 4"):  # the loop's own message passes unchanged
        with outside_steps(ckpts, "lorakit train r.yaml --resume"), GracefulStop("x") as stop:
            stop.signum = signal.SIGINT
            raise stop.stopped(4, ckpts / "step-000004")


@pytest.mark.slow
def test_ctrl_c_while_loading_saves_nothing_and_says_so(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl"), out))
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=subprocess_env(),
                            preexec_fn=sigint_as_from_a_terminal)
    seen = []
    for line in proc.stdout:  # stage lines come as each stage ends: the model is loading after this one
        seen.append(line)
        if line.startswith("tokenizing data"):
            proc.send_signal(signal.SIGINT)
            break
    output = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_INTERRUPTED, output
    assert "interrupted before anything was saved; rerun the same command" in output and "Traceback" not in output
    assert not out.exists()
