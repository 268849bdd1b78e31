"""CPU threads (lorakit.training.threads) and micro-batches built ahead (lorakit.training.prefetch)."""

import os
import subprocess
import sys
import threading

import pytest

from lorakit.training.prefetch import Prefetch
from lorakit.training import threads
from lorakit.training.threads import cgroup_quota, choose_openmp_waits, choose_threads, usable_cpus


def test_threads_follow_the_usable_cpus(monkeypatch, tmp_path):
    assert usable_cpus() == min(len(os.sched_getaffinity(0)), cgroup_quota() or 10**6)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(None) == usable_cpus() and choose_threads(1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert choose_threads(None) == 5 and choose_threads(1) == 1  # the user's setting, then the recipe's
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * usable_cpus()))
    assert choose_threads(None) == 1  # never 0, however many processes share the machine
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert cgroup_quota(quota) == 2
    quota.write_text("max 100000\n")
    assert cgroup_quota(quota) is None


def test_train_threads_beyond_the_machine_is_refused():
    # OpenMP starts every thread asked for: train.threads 100000 ended in "can't start new thread" (exit 1).
    from lorakit.errors import UsageError

    cores = os.cpu_count()
    assert choose_threads(cores) == cores
    with pytest.raises(UsageError, match=rf"train.threads: {cores + 1} is more than the {cores} CPUs.*at most {cores}"):
        choose_threads(cores + 1)


def test_train_threads_sets_torch_threads(tiny_model_dir, tmp_path):
    import json

    import torch

    from run_helpers import cli, recipe_dict, write_data, write_recipe

    recipe = recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl", 8), tmp_path / "run", max_steps=1,
                         threads=1)
    before = torch.get_num_threads()
    try:
        result = cli("train", write_recipe(tmp_path / "r.yaml", recipe))
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
        assert "1 (torch intra-op); OpenMP waits: " in result.output  # how the threads wait, in the settings
    finally:
        torch.set_num_threads(before)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "1 CPU threads" in records[-1]["peak_flops_source"]


@pytest.fixture
def no_wait_settings(monkeypatch):
    for key in (*threads.USER_KEYS, "LORAKIT_OPENMP_WAITS"):
        monkeypatch.delenv(key, raising=False)


def test_openmp_threads_spin_briefly_on_idle_cpus_and_sleep_beside_other_tasks(no_wait_settings):
    """Idle machine: a bounded spin (a passive thread must be woken for each of a step's thousands of small
    parallel regions); another runnable task, or no way to tell: passive waits (a spinning thread burns the
    slice its partner needs). The choice is what the run's settings report."""
    assert choose_openmp_waits(others=0).startswith("spin up to 10,000")
    assert os.environ["GOMP_SPINCOUNT"] == "10000" and "OMP_WAIT_POLICY" not in os.environ
    assert threads.openmp_waits() == os.environ["LORAKIT_OPENMP_WAITS"]
    for key in (*threads.USER_KEYS, "LORAKIT_OPENMP_WAITS"):
        os.environ.pop(key, None)
    assert choose_openmp_waits(others=2) == "passive (2 other runnable task(s) at start)"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ
    os.environ.pop("OMP_WAIT_POLICY")
    os.environ.pop("LORAKIT_OPENMP_WAITS")
    assert choose_openmp_waits(others=-1) == "passive (unknown load)"


def test_a_wait_setting_the_user_made_is_kept(no_wait_settings, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert choose_openmp_waits(others=0) == "OMP_WAIT_POLICY=ACTIVE (from the environment)"
    assert "GOMP_SPINCOUNT" not in os.environ and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def _task(proc, pid, tid, state, nice, comm="python (busy) x"):
    stat = proc / str(pid) / "task" / str(tid) / "stat"
    stat.parent.mkdir(parents=True, exist_ok=True)
    fields = [state, "1", "1", "1", "0", "-1", "0", "0", "0", "0", "0", "5", "5", "0", "0", "20", str(nice), "1"]
    stat.write_text(f"{pid} ({comm}) {' '.join(fields)}\n")


def test_competing_tasks_counts_runnable_tasks_at_this_priority_only(tmp_path):
    """The least of the /proc/loadavg samples; where it shows others, only runnable tasks not niced below this
    process compete (a nice 10 job gets a ninth of a core beside it); unreadable /proc: -1 (passive)."""
    proc = tmp_path
    (proc / "loadavg").write_text("0.31 0.96 1.10 1/111 19204\n")
    assert threads.competing_tasks(samples=2, interval=0, proc=proc) == 0  # only this process's own thread
    (proc / "loadavg").write_text("2.00 1.96 1.10 4/111 19204\n")
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    _task(proc, 100, 100, "R", mine + 10)  # a niced busy loop
    _task(proc, 101, 101, "S", mine)  # asleep
    _task(proc, 102, 102, "R", mine)  # a busy process at this priority ...
    _task(proc, 102, 103, "R", mine)  # ... with a second busy thread
    _task(proc, os.getpid(), os.getpid(), "R", mine)  # this process itself
    assert threads.competing_tasks(samples=1, proc=proc) == 2
    for tid in (102, 103):
        (proc / "102" / "task" / str(tid) / "stat").unlink()
    assert threads.competing_tasks(samples=1, proc=proc) == 0  # the niced job alone does not count
    (proc / "loadavg").unlink()
    assert threads.competing_tasks(proc=proc) == -1


def test_cli_chooses_waits_before_torch_loads(no_wait_settings):
    """The entry point decides before torch loads OpenMP: beside two busy processes, passive waits; a value
    the user chose is kept."""
    probe = ("import os, sys; sys.argv = ['lorakit', '--version']\n"
             "from lorakit.cli import run\n"
             "try:\n    run()\nexcept SystemExit:\n    pass\n"
             "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ).stdout
        assert out.split()[-2:] == ["PASSIVE", "False"]
    finally:
        for p in busy:
            p.kill()
            p.wait()
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}).stdout
    assert out.split()[-2] == "ACTIVE"


def test_the_next_step_is_collated_while_this_one_computes():
    started = {s: threading.Event() for s in range(4)}
    made = []

    def make(step):
        made.append((step, threading.current_thread().name))
        started[step].set()
        return f"batches of step {step}"

    with Prefetch(make, stop=3) as ahead:
        assert ahead.get(0) == "batches of step 0"
        # Step 1 is being built before the loop asks for it: while step 0 "computes".
        assert started[1].wait(timeout=10)
        assert ahead.get(1) == "batches of step 1" and ahead.get(2) == "batches of step 2"
    assert [s for s, _ in made] == [0, 1, 2] and not started[3].is_set()  # nothing past the last step
    assert all(name.startswith("lorakit-collate") for _, name in made)


def test_prefetch_reraises_in_the_loop():
    def make(step):
        raise ValueError(f"bad row in step {step}")

    with Prefetch(make, stop=2) as ahead, pytest.raises(ValueError, match="step 0"):
        ahead.get(0)
