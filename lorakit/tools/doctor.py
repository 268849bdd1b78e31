"""`lorakit doctor`: is this machine ready to fine-tune? Versions, GPUs, bf16, bitsandbytes, hub, disk.

Each check returns Findings (ok / info / warn / fail) that carry what to do about a problem. Nothing here
can hang: the hub probe runs in a daemon thread with a short deadline and is skipped when HF_HUB_OFFLINE is set.
"""

from __future__ import annotations

import shutil
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
OPTIONAL_EXTRAS = {"plot": "loss.png and `lorakit plot`",
                   **{t: f"output.report_to: [{t}]" for t in ("tensorboard", "mlflow", "wandb", "trackio", "aim")}}


@dataclass
class Finding:
    name: str
    status: str
    detail: str
    fix: str = ""


def check_versions() -> list[Finding]:
    """Python and every requirement of lorakit (as installed) against the ranges lorakit declares and the
    versions its test suite passed with (the lock shipped in the package, lorakit/lock.txt)."""
    import platform

    from packaging.requirements import Requirement

    from lorakit.versions import canonical, lock_path, newer_than_tested, read_lock

    findings = [Finding("python", OK, platform.python_version())]
    try:
        findings.append(Finding("lorakit", OK, metadata.version("lorakit")))
        requires = metadata.requires("lorakit") or []
    except metadata.PackageNotFoundError:
        return findings + [Finding("lorakit", FAIL, "not installed as a package", "pip install -e . in the repository")]
    try:
        tested = read_lock()
    except (OSError, ValueError) as e:
        tested = {}
        findings.append(Finding("lock", WARN, f"cannot read the tested versions ({lock_path()}): {e}",
                                "reinstall lorakit"))
    for line in requires:
        req = Requirement(line)
        extra = next((e for e in OPTIONAL_EXTRAS if req.marker and req.marker.evaluate({"extra": e})), None)
        if req.marker and extra is None:
            continue  # test/dev tools are not part of a working install
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            if extra:
                findings.append(Finding(req.name, INFO, f"not installed (optional: {OPTIONAL_EXTRAS[extra]})",
                                        f"pip install 'lorakit[{extra}]'"))
            else:
                findings.append(Finding(req.name, FAIL, "not installed", f"pip install '{req.name}{req.specifier}'"))
            continue
        locked = tested.get(canonical(req.name))
        detail = f"{version} (tested with {locked})" if locked else f"{version} (not in the tested lock)"
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            findings.append(Finding(req.name, FAIL, f"{version} is outside the supported range {req.specifier}",
                                    f"pip install '{req.name}{req.specifier}'"))
        elif locked and (newer := newer_than_tested(version, locked)):
            findings.append(Finding(req.name, WARN, f"{detail}: a newer {newer} release than lorakit was tested with",
                                    f"if something breaks: pip install '{req.name}=={locked}' (or make install)"))
        else:
            findings.append(Finding(req.name, OK, detail))
    return findings


def check_gpus() -> list[Finding]:
    import torch

    if not torch.cuda.is_available():
        if shutil.which("nvidia-smi") and torch.version.cuda is None:
            return [Finding("gpu", FAIL, f"nvidia-smi sees a GPU but torch {torch.__version__} is a CPU build",
                            "reinstall torch with CUDA: pip install --force-reinstall torch (PyPI's Linux default)")]
        return [Finding("gpu", INFO, "no CUDA GPU: lorakit trains on CPU in float32 (dtype auto)",
                        "fine for the demo, tests and tiny models; use a CUDA GPU for 1B+ models")]
    findings = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        bf16 = torch.cuda.get_device_capability(i) >= (8, 0)
        detail = f"cuda:{i} {props.name}, {props.total_memory / 2**30:.1f} GiB, bf16 {'yes' if bf16 else 'no'}"
        fix = "" if bf16 else "no bfloat16 on this GPU: use model.dtype: float16 (or float32); auto picks float32"
        findings.append(Finding("gpu", OK if bf16 else WARN, detail, fix))
    findings.append(Finding("cuda", OK, f"torch built with CUDA {torch.version.cuda}"))
    return findings


def check_bitsandbytes() -> list[Finding]:
    try:
        import bitsandbytes
        from bitsandbytes import cextension
    except Exception as e:  # an import that fails is exactly what doctor reports
        return [Finding("bitsandbytes", FAIL, f"import failed: {type(e).__name__}: {e}",
                        "pip install --force-reinstall bitsandbytes; quantization and 8-bit optimizers need it")]
    backend = getattr(cextension, "BNB_BACKEND", "unknown")
    mock = getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", None)
    if mock is not None and isinstance(getattr(cextension, "lib", None), mock):
        return [Finding("bitsandbytes", FAIL, f"{bitsandbytes.__version__}: the native {backend} library did not load",
                        "reinstall bitsandbytes for your CUDA/ROCm version; 4-bit/8-bit loading will fail until then")]
    if backend == "CPU":
        return [Finding("bitsandbytes", INFO, f"{bitsandbytes.__version__}, CPU backend",
                        "4-bit/8-bit bases run on CPU (slowly); paged optimizers need a CUDA GPU")]
    return [Finding("bitsandbytes", OK, f"{bitsandbytes.__version__}, {backend} backend")]


def check_hub(timeout: float = 3.0, offline: bool | None = None, endpoint: str | None = None) -> list[Finding]:
    """Whether the Hugging Face Hub answers within ``timeout`` seconds (HF_HUB_OFFLINE skips the probe)."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE if offline is None else offline
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    if offline:
        return [Finding("hub", INFO, "offline mode (HF_HUB_OFFLINE): the hub is not contacted",
                        "models must be local directories, .gguf files or already in the HF cache")]
    result: dict = {}

    def probe() -> None:
        try:  # a tiny public API call: the hub answers 200 with JSON
            with urllib.request.urlopen(f"{endpoint}/api/models?limit=1", timeout=timeout) as r:
                result["status"] = r.status
        except urllib.error.HTTPError as e:
            result["status"] = e.code
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {getattr(e, 'reason', e)}"

    thread = threading.Thread(target=probe, daemon=True)  # DNS lookups ignore socket timeouts: bound the wait
    thread.start()
    thread.join(timeout + 0.5)
    fix = "check the network or HTTPS_PROXY, or set HF_HUB_OFFLINE=1 and use local models and data"
    if result.get("status", 500) < 400:
        return [Finding("hub", OK, f"{endpoint} answered (HTTP {result['status']})")]
    if "status" in result:  # something answered, but not as the hub does: a proxy, a portal, a wrong HF_ENDPOINT
        return [Finding("hub", WARN, f"{endpoint} answered HTTP {result['status']} to an API call",
                        "check HF_ENDPOINT and the proxy settings, or set HF_HUB_OFFLINE=1 and use local models")]
    if "error" in result:
        return [Finding("hub", WARN, f"{endpoint} unreachable: {result['error']}", fix)]
    return [Finding("hub", WARN, f"{endpoint} did not answer within {timeout:g}s", fix)]


def check_disk(min_free_gib: float = 20.0) -> list[Finding]:
    from huggingface_hub import constants

    path = Path(constants.HF_HUB_CACHE)
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free / 2**30
    detail = f"{free:.0f} GiB free for the model cache ({constants.HF_HUB_CACHE})"
    if free < min_free_gib:
        return [Finding("disk", WARN, detail, "a 7B model takes ~15 GB in bf16; set HF_HOME to a larger disk")]
    return [Finding("disk", OK, detail)]


def run_checks(hub_timeout: float = 3.0) -> list[Finding]:
    findings = check_versions()
    for check in (check_gpus, check_bitsandbytes, lambda: check_hub(hub_timeout), check_disk):
        try:
            findings += check()
        except Exception as e:  # one broken check must not hide the others
            findings.append(Finding(getattr(check, "__name__", "check"), FAIL, f"{type(e).__name__}: {e}"))
    return findings
