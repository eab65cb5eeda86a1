import copy
import logging

import pytest
import torch
from torch import nn

from brushwork.errors import BrushworkError
from brushwork.hardware import CompiledModule


def has_cpp_compiler() -> bool:
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return bool(get_cpp_compiler())
    except Exception:  # inductor's InvalidCxxCompiler, or a broken toolchain
        return False


needs_cpp_compiler = pytest.mark.skipif(not has_cpp_compiler(), reason="compiling needs a C++ compiler (g++)")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.linear = nn.Linear(4, 2)

    def forward(self, images: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.linear(self.conv(images).mean((2, 3))) * scale


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRUSHWORK_CACHE", str(tmp_path))
    return tmp_path / "compiled"


def inputs(batch: int = 2):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch)), torch.tensor(2.0)


def refuse_to_compile(*args, **kwargs):
    raise AssertionError("compiled again instead of loading the kept package")


@pytest.mark.slow   # a real AOTInductor compile takes minutes even for this module
@needs_cpp_compiler
@torch.no_grad()
def test_compiled_module_matches_eager_and_a_new_instance_loads_the_kept_package(tiny, cache, monkeypatch):
    compiled = CompiledModule(tiny, "tiny")
    torch.testing.assert_close(compiled(*inputs()), tiny(*inputs()))
    packages = list(cache.glob("*.pt2"))
    assert [p.name for p in packages] == [compiled.package_path(*inputs()).name]
    assert packages[0].name.startswith("tiny-")
    assert not list(cache.glob(".*")), "no staging file is left behind"

    monkeypatch.setattr(CompiledModule, "_compile", refuse_to_compile)
    again = CompiledModule(tiny, "tiny")  # as in a new process
    torch.testing.assert_close(again(*inputs()), tiny(*inputs()))


def test_the_package_depends_on_weights_inputs_and_threads(tiny, cache):
    path = CompiledModule(tiny, "tiny").package_path(*inputs())
    assert CompiledModule(copy.deepcopy(tiny), "tiny").package_path(*inputs()) == path
    changed = copy.deepcopy(tiny)
    with torch.no_grad():
        changed.linear.bias += 1
    assert CompiledModule(changed, "tiny").package_path(*inputs()) != path
    assert CompiledModule(tiny, "tiny").package_path(*inputs(batch=3)) != path
    assert CompiledModule(tiny, "tiny").package_path(inputs()[0].double(), inputs()[1]) != path
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert CompiledModule(tiny, "tiny").package_path(*inputs()) != path
    finally:
        torch.set_num_threads(threads)


def test_without_a_cpp_compiler_the_error_says_what_to_do(tiny, cache):
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("no-such-compiler++",)}), pytest.raises(BrushworkError,
                                                                                   match="C\\+\\+ compiler"):
        CompiledModule(tiny, "tiny")(*inputs())
    assert not cache.exists() or not list(cache.iterdir())


def test_a_module_export_cannot_trace_is_a_clear_error(cache):
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x  # a branch on values: export cannot trace it

    with pytest.raises(BrushworkError, match="compiling branchy for cpu failed .*without --compile"):
        CompiledModule(DataDependent(), "branchy")(torch.ones(2))
    assert not list(cache.glob("*.pt2")) and not list(cache.glob(".*"))


@pytest.mark.slow
@needs_cpp_compiler
@torch.no_grad()
def test_a_corrupt_package_is_compiled_again_and_an_unwritable_cache_still_compiles(tiny, cache, caplog,
                                                                                      tmp_path, monkeypatch):
    path = CompiledModule(tiny, "tiny").package_path(*inputs())
    cache.mkdir(parents=True)
    path.write_bytes(b"not a package")
    with caplog.at_level(logging.WARNING, logger="brushwork.hardware"):
        torch.testing.assert_close(CompiledModule(tiny, "tiny")(*inputs()), tiny(*inputs()))
    assert "did not load" in caplog.text
    assert path.stat().st_size > 1000  # replaced by a real package

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("BRUSHWORK_CACHE", str(blocked))
    with caplog.at_level(logging.WARNING, logger="brushwork.hardware"):
        torch.testing.assert_close(CompiledModule(tiny, "tiny")(*inputs()), tiny(*inputs()))
    assert "cannot keep the compiled tiny" in caplog.text
