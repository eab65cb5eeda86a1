"""Facts about the machine that choose defaults (precision) in training and generation, and compilation."""

import hashlib
import logging
import os
import platform
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

from brushwork.errors import BrushworkError

log = logging.getLogger(__name__)


@cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line for line in text.splitlines() if line.startswith(("flags", "Features"))),
                          "").split(":")[-1].split())


def require_cpp_compiler(otherwise: str) -> None:
    """BrushworkError unless inductor finds a C++ compiler: it builds its CPU kernels with one."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        raise BrushworkError("compiling needs a C++ compiler (g++ or clang++, or $CXX), and none was found: "
                             f"install one (e.g. apt install g++) or {otherwise}") from None


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (x86 AVX512-BF16 or AMX, Arm BF16), where bf16 kernels beat
    fp32 ones; elsewhere bf16 is emulated and slower."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


# Measured on a 6.5M UNet, bf16, batch 2, 2 threads: concatenating linears that share an input 3%, and
# on the CPU picking each matmul's kernel by timing (inductor's C++ GEMM templates) 7% more, for a
# compile 3x as long (2.5 min), paid once per cached package.
INDUCTOR_CONFIGS = {"freezing": True, "cpp.enable_concat_linear": True}
CPU_INDUCTOR_CONFIGS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                        "max_autotune_report_choices_stats": False, "autotune_num_choices_displayed": 0}


def _signature(args: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((a.shape, a.dtype, a.device) for a in args)


class CompiledModule:
    """`module` compiled ahead of time by AOTInductor, once per input signature (shapes, dtypes, device), and
    kept as a package in the cache (~/.cache/brushwork/compiled, or $BRUSHWORK_CACHE/compiled).

    Why not torch.compile: it evaluates its guards on every call (1.3-1.6 ms of a 12 ms UNet call here), and
    every new process compiles again (about a minute for a UNet), where a cached package loads in a second.
    Inductor freezes the weights into constants, so oneDNN packs the convolution weights once: most of the
    gain on the CPU. Only valid for inference, which is all the callers do. `module.forward` takes tensors
    only and returns one tensor."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.module = module.eval()
        self.name = name
        self._runners: dict[tuple, object] = {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        signature = _signature(args)
        runner = self._runners.get(signature)
        if runner is None:
            runner = self._runners[signature] = self._load_or_compile(args, self.package_path(*args))
        return runner(*args)

    def package_path(self, *args: torch.Tensor) -> Path:
        """Where the package compiled for these inputs is kept."""
        from brushwork.data.dataset import cache_root

        return cache_root() / "compiled" / f"{self.name}-{self._digest(_signature(args))}.pt2"

    def _digest(self, signature: tuple) -> str:
        """Everything the compiled code depends on: weights, module structure, input signature, library
        versions, the machine's instruction set and the thread count (inductor writes it into its loops)."""
        import diffusers
        import transformers

        from brushwork import __version__

        digest = hashlib.sha256()
        machine = [platform.machine(), f"threads={torch.get_num_threads()}", *sorted(cpu_flags())]
        if any(device.type == "cuda" for _, _, device in signature):
            machine.append(torch.cuda.get_device_name())
        for part in (torch.__version__, diffusers.__version__, transformers.__version__, __version__,
                     repr(signature), repr(self.module), repr(INDUCTOR_CONFIGS | CPU_INDUCTOR_CONFIGS),
                     *machine):
            digest.update(part.encode() + b"\0")
        for key, tensor in self.module.state_dict().items():
            digest.update(key.encode() + str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:20]

    def _load_or_compile(self, args: tuple, path: Path):
        if path.is_file():
            try:
                return _runner(path)
            except Exception as error:  # a package from a crashed write or an incompatible build: compile anew
                log.warning("compiled package %s did not load (%s); compiling again", path, error)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return self._compile(args, path)
        except OSError as error:  # an unwritable cache: compile into a folder that is dropped after loading
            log.warning("cannot keep the compiled %s in %s (%s)", self.name, path.parent, error)
            with tempfile.TemporaryDirectory() as folder:
                return self._compile(args, Path(folder) / path.name)

    def _compile(self, args: tuple, path: Path):
        log.warning("compiling %s for a first input of shape %s, once: the result is kept in %s", self.name,
                    tuple(args[0].shape), path.parent)
        require_cpp_compiler("generate without --compile")
        staging = path.with_name(f".{path.stem}.{os.getpid()}.pt2")
        configs = dict(INDUCTOR_CONFIGS)
        if all(a.device.type == "cpu" for a in args):
            configs |= CPU_INDUCTOR_CONFIGS
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", module="torch")  # inductor's own deprecation notices
                program = torch.export.export(self.module, args)
                torch._inductor.aoti_compile_and_package(program, package_path=str(staging),
                                                         inductor_configs=configs)
            os.replace(staging, path)  # whole packages only: readers never see a partial one
        except OSError:
            raise
        except Exception as error:  # export and inductor raise many kinds (e.g. on a device they do not cover)
            device = args[0].device
            raise BrushworkError(f"compiling {self.name} for {device} failed ({type(error).__name__}: "
                                 f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
                                 "generate without --compile") from error
        finally:
            staging.unlink(missing_ok=True)
        return _runner(path)


def _runner(path: Path):
    """The package's model as a function of a flat tuple of tensors to one tensor. Its loader is called
    directly: the package's own __call__ flattens and unflattens arguments through pytree specs on every call
    (0.4-0.9 ms of a 10-20 ms UNet call here), which inputs and an output of this form do not need."""
    loader = torch._inductor.aoti_load_package(str(path)).loader
    return lambda *args: loader.boxed_run(list(args))[0]
