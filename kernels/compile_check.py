"""Compile every Triton kernel the engine launches to cubin for GPUs that are not there.

For each kernel in ``KERNELS``, its module's ``compile_variants()`` gives launches on mock
tensors; Triton's own argument specialisation (the binder and ``_pack_args`` that
``JITFunction.run`` uses; written against triton 3.9) turns each into the signature, constants
and attributes a real launch would compile, and ``triton.compile`` builds it for each target with
the ptxas that Triton ships. No GPU or CUDA driver is needed. Reports registers per thread,
spills and shared memory per variant and target; any kernel that does not compile fails::

    python -m apudae_kernels.compile_check                    # sm_80, sm_90, sm_100
    python -m apudae_kernels.compile_check --targets sm_90 --quick --out report.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# The kernels the engine launches, by name: the module that launches each (and defines its
# ``compile_variants``). Only adaptive_update_triton is launched (backends/compiled.py).
KERNELS = {"adaptive_update": "apudae_kernels.adaptive_update"}
# Compute capability of each target: A100, H100, B200.
TARGETS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}


@dataclass
class Compiled:
    """One specialisation of one variant compiled for one target."""

    kernel: str
    variant: str
    target: str
    specialisation: str
    arch: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    num_warps: int = 0
    error: str = ""


@dataclass
class Row:
    """A table row: one variant on one target, over its specialisations."""

    kernel: str
    variant: str
    target: str
    compiled: list[Compiled] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [f"{c.specialisation}: {c.error}" for c in self.compiled if c.error]

    @property
    def registers(self) -> str:
        regs = sorted({c.registers for c in self.compiled if not c.error})
        if not regs:
            return "-"
        return str(regs[0]) if len(regs) == 1 else f"{regs[0]}-{regs[-1]}"

    @property
    def spills(self) -> int:
        return max(c.spill_stores + c.spill_loads for c in self.compiled)

    @property
    def shared(self) -> int:
        return max(c.shared for c in self.compiled)


def _specialisation(launch, backend) -> tuple[str, dict]:
    """What ``kernel[grid](*args, **kwargs)`` would compile on ``backend``'s target: a short
    description of the integer specialisation and ASTSource/compile arguments."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    # As JITFunction.run sets them before binding (environment knobs, off by default).
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    described = []
    for param, (ty, attr) in zip(kernel.params, spec, strict=True):
        if param.is_constexpr or ty.startswith("*") or ty.startswith("fp"):
            continue
        if ty == "constexpr":
            described.append(f"{param.name}={attr}")
        else:
            described.append(f"{param.name}:{ty}{'/16' if attr == 'D' else ''}")
    job = {
        "module": kernel.fn.__module__,
        "name": kernel.fn.__name__,
        "signature": signature,
        "constexprs": constexprs,
        "attrs": attrs,
        "options": dict(options.__dict__),
    }
    return " ".join(described), job


def _compile(job: dict, capability: int) -> dict:
    """Compile one job for ``capability``; the numbers come from ptxas's own -v log."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job["module"]), job["name"])
    source = ASTSource(kernel, job["signature"], job["constexprs"], job["attrs"])
    ptxas_log = io.StringIO()
    try:
        # Triton prints ptxas's log (and, on failure, the PTX) to stdout: keep it for parsing.
        with contextlib.redirect_stdout(ptxas_log):
            compiled = triton.compile(
                source, target=GPUTarget("cuda", capability, 32), options=job["options"]
            )
    except Exception as exc:  # a kernel that does not compile is a result, not a crash
        # The message, with ptxas's stderr when it failed, but not the repro command after it.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        lines = lines[: next((i for i, x in enumerate(lines) if x.startswith("Repro")), 4)]
        return {"error": f"{type(exc).__name__}: {' | '.join(lines[:4])[:400]}"}
    text = ptxas_log.getvalue()
    arch = re.search(r"Compiling entry function '.*' for '(\w+)'", text)
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text
    )
    if arch is None or regs is None or spills is None or "cubin" not in compiled.asm:
        return {"error": f"no cubin or no ptxas -v report; ptxas said: {text.strip()[:300]!r}"}
    meta = compiled.metadata
    return {
        "arch": arch.group(1),
        "registers": int(regs.group(1)),
        "stack": int(spills.group(1)),
        "spill_stores": int(spills.group(2)),
        "spill_loads": int(spills.group(3)),
        "shared": int(meta.shared),
        "num_warps": int(meta.num_warps),
    }


_KNOBS = (("cache", "dir"), ("compilation", "always_compile"), ("nvidia", "dump_ptxas_log"))


def _set_knobs(cache_dir: str) -> list:
    """Compile every kernel through ptxas (a fresh cache, no cache hits) and have Triton print
    ptxas's -v log; returns the previous values for ``_restore_knobs``."""
    from triton import knobs

    old = [getattr(getattr(knobs, group), name) for group, name in _KNOBS]
    for (group, name), value in zip(_KNOBS, (cache_dir, True, True), strict=True):
        setattr(getattr(knobs, group), name, value)
    return old


def _restore_knobs(old: list) -> None:
    from triton import knobs

    for (group, name), value in zip(_KNOBS, old, strict=True):
        setattr(getattr(knobs, group), name, value)


def ptxas_versions(targets: list[str]) -> dict[str, str]:
    """The ptxas Triton uses for each target (path and CUDA release); raises RuntimeError
    naming the fix when one is missing."""
    from triton.backends.nvidia.compiler import get_ptxas

    out = {}
    for t in targets:
        try:
            tool = get_ptxas(TARGETS[t])
        except RuntimeError as exc:
            raise RuntimeError(
                f"{exc} for {t}: install triton's wheel with its CUDA backend (it ships ptxas), "
                "or point TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH at one."
            ) from exc
        out[t] = f"{tool.version} ({Path(tool.path).name})"
    return out


def compile_all(targets: list[str], quick: bool = False, jobs: int = 1) -> list[Row]:
    """Compile every launched kernel's variants for ``targets`` (names in ``TARGETS``).

    ``quick`` keeps each kernel's first variant only (the engine's common launch). Returns one
    Row per kernel, variant and target, in enumeration order; failures are in ``Row.errors``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    rows: dict[tuple[str, str, str], Row] = {}
    work: list[tuple[Compiled, dict, int]] = []
    seen: set[tuple[str, ...]] = set()
    for name, module in KERNELS.items():
        variants = list(importlib.import_module(module).compile_variants())
        if quick:
            variants = [(v, launch) for v, launch in variants if v == variants[0][0]]
        for target in targets:
            backend = make_backend(GPUTarget("cuda", TARGETS[target], 32))
            for variant, launch in variants:
                if not isinstance(launch.kernel, JITFunction):
                    raise RuntimeError(f"{name}: {launch.kernel!r} is not a compilable "
                                       "JITFunction (imported under TRITON_INTERPRET?).")
                row = rows.setdefault((name, variant, target), Row(name, variant, target))
                spec, job = _specialisation(launch, backend)
                key = (name, variant, target, repr([job[k] for k in ("signature", "constexprs",
                                                                      "attrs", "options")]))
                if key in seen:
                    continue  # another launch Triton compiles the same way
                seen.add(key)
                row.compiled.append(Compiled(name, variant, target, spec))
                work.append((row.compiled[-1], job, TARGETS[target]))
    log.info("compiling %d kernels (%d variants) with %d worker(s)", len(work), len(rows), jobs)
    with tempfile.TemporaryDirectory(prefix="triton-cubin-") as cache:
        if jobs <= 1:
            old = _set_knobs(cache)
            try:
                results = [_compile(job, cc) for _, job, cc in work]
            finally:
                _restore_knobs(old)
        else:
            with concurrent.futures.ProcessPoolExecutor(
                jobs, initializer=_set_knobs, initargs=(cache,)
            ) as pool:
                futures = [pool.submit(_compile, job, cc) for _, job, cc in work]
                results = [f.result() for f in futures]
    for (compiled, _, _), result in zip(work, results, strict=True):
        for key, value in result.items():
            setattr(compiled, key, value)
    return list(rows.values())


def _host() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.+)", cpuinfo).group(1).strip()
    except (OSError, AttributeError):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()}"


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # no torch or a broken driver: no usable GPU either way
        return False


# The oldest triton whose launch binding (``triton.knobs``) this check reproduces.
MIN_TRITON = (3, 4)


def header(targets: list[str]) -> dict:
    """What the report was made with: triton, ptxas per target, the host, and no device.
    Raises ImportError, naming the installed version, where triton is older than the check's
    ``MIN_TRITON`` (the argument binding above uses ``triton.knobs``)."""
    import triton

    found = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
    if found < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        raise ImportError(f"needs triton >= {need} (triton.knobs); this is triton "
                          f"{triton.__version__}: pip install 'triton>={need}'")
    return {
        "triton": triton.__version__,
        "ptxas": ptxas_versions(targets),
        "host": _host(),
        "gpu_present": _has_gpu(),
        "date": time.strftime("%Y-%m-%d"),
    }


def table(rows: list[Row]) -> list[list[str]]:
    head = ["kernel", "variant", "target", "specialisations", "registers", "spills (B)",
            "shared (B)", "status"]
    body = [[r.kernel, r.variant, r.target, str(len(r.compiled)), r.registers, str(r.spills),
             str(r.shared), "FAILED" if r.errors else "ok"] for r in rows]
    return [head, *body]


def markdown(rows: list[Row], info: dict, command: str) -> str:
    ptxas = ", ".join(f"{t}: {v}" for t, v in info["ptxas"].items())
    device = ("a GPU was present but not used" if info["gpu_present"]
              else "no GPU or CUDA driver on the machine")
    lines = [
        "# Triton kernels compiled to cubin, without a device",
        "",
        f"`{command}` on {info['date']}: triton {info['triton']}, ptxas {ptxas}; host "
        f"{info['host']}; {device} (Triton compiles for a GPUTarget, not a device).",
        "",
        "Each row is one variant the launcher can choose, compiled for every way Triton "
        "specialises its integer arguments (d == 1, d % 16 == 0 or not, key base int32 or "
        "int64): registers per thread (range over those), bytes of spill stores plus loads "
        "(largest), shared memory per program (largest). The engine's loop launches the "
        "float32 variants; float16 and bfloat16 are the kernel API's.",
        "",
    ]
    rows_md = table(rows)
    lines.append("| " + " | ".join(rows_md[0]) + " |")
    lines.append("|" + "|".join("---" for _ in rows_md[0]) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows_md[1:]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apudae_kernels.compile_check",
        description="Compile every Triton kernel the engine launches to cubin for each target "
        "(no GPU needed) and report registers, spills and shared memory. Exits 1 if any "
        "kernel does not compile.",
    )
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--quick", action="store_true",
                        help="only each kernel's first variant (the engine's common launch)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--jobs", type=int, default=cpus or 1,
                        help="compiler processes (default: the CPUs this process may use)")
    parser.add_argument("--out", type=Path,
                        help="also write the report: .json (every specialisation) or .md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The check compiles; it never interprets (tests/conftest.py sets this for the CPU suite).
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        info = header(args.targets)
        rows = compile_all(args.targets, quick=args.quick, jobs=args.jobs)
    except (ImportError, RuntimeError) as exc:
        print(f"compile_check: {exc}", file=sys.stderr)
        return 2
    cells = table(rows)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"triton {info['triton']}; ptxas "
          + ", ".join(f"{t}: {v}" for t, v in info["ptxas"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".md":
            command = "python -m apudae_kernels.compile_check " + " ".join(argv or sys.argv[1:])
            args.out.write_text(markdown(rows, info, command.strip()))
        else:
            report = {**info, "rows": [
                {"kernel": r.kernel, "variant": r.variant, "target": r.target,
                 "compiled": [asdict(c) for c in r.compiled]} for r in rows]}
            args.out.write_text(json.dumps(report, indent=1) + "\n")
        log.info("wrote %s", args.out)
    failed = [r for r in rows if r.errors]
    for r in failed:
        for e in r.errors:
            print(f"FAILED {r.kernel} [{r.variant}] {r.target}: {e}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(rows)} kernel variants did not compile", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
