"""The steps of `lorakit export --format gguf`: check everything, merge an adapter if needed, write, verify,
publish.

Every refusal (output exists, unsupported architecture or tokenizer) comes before any work. The GGUF is written
to a temporary file next to FILE.gguf and renamed onto it only when complete (and verified, with --verify);
an adapter is merged on the fly into a temporary directory there too, by `lorakit merge`'s streaming merge.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorakit.errors import SafetyError, UsageError
from lorakit.export.target import Target, display_name, resolve_target
from lorakit.publish import check_file_output, check_inputs_apart, publish_file_output

FORMATS = ("gguf", "gguf-lora")


@dataclass
class ExportReport:
    output: Path
    quant: str
    stop_ids: list[int] = field(default_factory=list)
    max_abs_diff: float | None = None
    kl: float | None = None
    modelfile: Path | None = None


def check_output(output: Path, overwrite: bool, suffix: str = ".gguf") -> Path:
    """The resolved output path, refused before any work where it cannot be written (publish.check_file_output:
    empty, a dangling link, under a file, a directory, unwritable), or would replace a file without --overwrite
    (with it, the old file is moved aside at publish time, never replaced in place)."""
    out = check_file_output("-o", output, "model.gguf")
    if out.suffix.lower() != suffix:  # Model.GGUF is a GGUF file, as lorakit reads it (lorakit.paths.is_gguf)
        stem = out.stem if out.stem.lower() != suffix else "model"  # '-o .gguf' names the suffix alone
        raise UsageError(f"-o {output}: the output is a {suffix} file; name it {stem}{suffix}")
    if not out.parent.is_dir():
        raise UsageError(f"-o {output}: directory {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise SafetyError(f"-o {output} exists; pass --overwrite to move it aside and write a new one, or choose "
                          "another name")
    return out


def check_apart(out: Path, target: Target) -> None:
    """The output file must not lie inside the model or adapter folder it is made from (exit 5)."""
    check_inputs_apart("-o", out, {"base model": target.model_dir, "adapter": target.adapter_dir})


def temporary_file(out: Path) -> Path:
    """The temporary file next to ``out``; files a killed export left behind are removed first."""
    for stale in out.parent.glob(f".{out.stem}.lorakit-tmp-*.gguf"):
        pid = stale.name.rsplit("-", 1)[-1].removesuffix(".gguf")
        if not (pid.isdigit() and _alive(int(pid))):
            stale.unlink(missing_ok=True)
    return out.with_name(f".{out.stem}.lorakit-tmp-{os.getpid()}.gguf")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


@contextmanager
def model_directory(target: Target, out: Path, allow_pickle: bool, log: Callable[[str], None]):
    """The Hugging Face model to export: the target's own, or its adapter merged into a temporary directory."""
    if target.kind == "model":
        yield target.model_dir
        return
    from lorakit.merge.merge import merge_adapter

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}.lorakit-merge-", dir=out.parent))
    try:
        merge_adapter(target.adapter_dir, tmp / "model", base=str(target.model_dir), allow_pickle=allow_pickle, log=log)
        yield tmp / "model"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_gguf(target: str | Path, output: str | Path, *, quant: str = "f16", overwrite: bool = False,
                verify: bool = False, base: str | None = None, allow_pickle: bool = False, progress: bool = True,
                log: Callable[[str], None] = print) -> ExportReport:
    """Write TARGET (run directory, adapter or merged model) as one GGUF file at ``output``."""
    import gguf

    from lorakit.console import work_progress
    from lorakit.export.gguf_model import (
        QUANTS, Hyper, add_hyperparameters, add_tensor_infos, plan_tensors, write_tensors,
    )
    from lorakit.export.gguf_vocab import add_tokenizer

    if quant not in QUANTS:
        raise UsageError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    out = check_output(Path(output), overwrite)
    resolved = resolve_target(target, base=base, allow_pickle=allow_pickle)
    check_apart(out, resolved)
    hp = Hyper.from_config(resolved.config, resolved.model_dir)
    report = ExportReport(out, quant)
    with model_directory(resolved, out, allow_pickle, log) as model_dir:
        tensors = plan_tensors(model_dir, resolved.arch, hp, quant)
        tmp = temporary_file(out)
        writer = gguf.GGUFWriter(tmp, resolved.arch)
        try:
            add_hyperparameters(writer, hp, quant, display_name(target))
            report.stop_ids = add_tokenizer(writer, model_dir, hp.vocab, log)
            add_tensor_infos(writer, tensors)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            total = sum(t.nbytes for t in tensors)
            with work_progress(progress, total, f"writing {out.name}") as advance:
                write_tensors(writer, tensors, advance)
            writer.close()
            log(f"wrote {len(tensors)} tensors ({total / 2**20:,.1f} MiB, {quant}) for {resolved.arch}; "
                f"stop tokens {report.stop_ids}")
            if verify:
                from lorakit.export.verify import verify_gguf

                report.max_abs_diff, report.kl = verify_gguf(tmp, model_dir, quant)
                log(f"verify: read back by transformers' GGUF loader: same tokens; max |Δlogit| "
                    f"{report.max_abs_diff:.3g}, mean KL {report.kl:.2e} nats/token: ok")
            publish_file_output(tmp, out)
        finally:
            writer.close()
            tmp.unlink(missing_ok=True)
    return report
