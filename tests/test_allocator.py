"""`openmm_stable.allocator`: freed memory stays in the process (no page faults to get it
back), and the replica engine applies it on CPU platforms."""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")

# Allocates, touches and frees blocks of mixed sizes (as a force evaluation does with its
# tensors), then prints the minor page faults of ten more such rounds and their page count.
#
# Nothing here is left to the machine: transparent huge pages are switched off for the
# process (prctl PR_SET_THP_DISABLE; with THP a 2 MiB page takes one fault instead of 512,
# whatever /sys/kernel/mm/transparent_hugepage says), and the control ("returned") sets
# glibc's thresholds explicitly to its documented starting values (128 KiB), which also
# switches off glibc's dynamic mmap threshold, whose behaviour differs between versions.
# So the control hands every block back to the kernel on free and must fault it in again,
# and "kept" tests only what keep_freed_memory() does.
_ROUNDS = textwrap.dedent("""
    import ctypes, resource, sys
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    PR_SET_THP_DISABLE = 41
    if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        print("no-thp-control")
        sys.exit(0)
    if sys.argv[1] == "kept":
        from openmm_stable.allocator import keep_freed_memory
        assert keep_freed_memory()
    elif sys.argv[1] == "threshold-only":  # the earlier setting: largest mmap threshold, 1 GiB trim
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        assert libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    else:
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        assert libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) and libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    sizes = [int(mib) for mib in sys.argv[2].split(",")]
    def one_round():
        blocks = []
        for mib in sizes:
            block = libc.malloc(mib << 20)
            ctypes.memset(block, 1, mib << 20)
            blocks.append(block)
        for block in blocks[::2] + blocks[1::2]:
            libc.free(block)
    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        one_round()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, 10 * sum(sizes) * 256)
""")


MIXED_MIB = "3,17,5,9,12,2,7"
# One block above glibc's largest mmap threshold (32 MiB), alone: as a batch of R = 128
# MACE replicas allocates while the heap is still smaller than it.
LARGE_MIB = "40"


def _faults_and_pages(mode: str, sizes_mib: str = MIXED_MIB) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode, sizes_mib], capture_output=True, text=True, check=True)
    if out.stdout.strip() == "no-thp-control":
        pytest.skip("this kernel cannot switch transparent huge pages off for a process (prctl)")
    faults, pages = out.stdout.split()
    return int(faults), int(pages)


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    faults_returned, pages = _faults_and_pages("returned")
    faults_kept, _ = _faults_and_pages("kept")
    # the control: blocks handed back to the kernel are faulted in again, page by page (this
    # shows that the count sees the faults); kept, they are reused without a fault.
    assert faults_returned > 0.9 * pages
    assert faults_kept < 0.01 * pages


@glibc_only
def test_blocks_above_the_largest_mmap_threshold_stay_too():
    # the mmap threshold cannot go above 32 MiB, so raising it (the earlier setting) still
    # maps and unmaps a 40 MiB block at every round; with mmap switched off it stays.
    faults_threshold_only, pages = _faults_and_pages("threshold-only", LARGE_MIB)
    faults_kept, _ = _faults_and_pages("kept", LARGE_MIB)
    assert faults_threshold_only > 0.9 * pages
    assert faults_kept < 0.01 * pages


def test_the_settings_are_the_documented_ones():
    from openmm_stable import allocator

    # mallopt(3): M_MMAP_MAX 0 disables mmap for large blocks, M_TRIM_THRESHOLD -1 disables trimming
    assert (allocator._M_MMAP_MAX, allocator.MMAP_MAX) == (-4, 0)
    assert (allocator._M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD_BYTES) == (-1, -1)
    assert allocator.MMAP_THRESHOLD_BYTES == 32 * 2**20


def test_engine_applies_it_on_cpu_unless_told_not_to(monkeypatch, ethanol):
    import openmm_stable.engine as engine_module
    from openmm_stable.models import create_model

    calls = []
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: calls.append(True) or True)
    z, _ = ethanol
    model = create_model("schnet", "tiny")
    engine_module.ReplicaEngine(model, z, 2, engine_module.EngineConfig(platform="CPU", keep_freed_memory=False))
    assert calls == []
    engine_module.ReplicaEngine(model, z, 2, engine_module.EngineConfig(platform="CPU"))
    assert calls == [True]


def test_pretrain_applies_it_on_cpu_unless_told_not_to(monkeypatch, tmp_path, xtb_ethanol):
    import importlib

    # (the package exports the function `pretrain` under the module's name)
    pretrain_module = importlib.import_module("openmm_stable.training.pretrain")
    calls = []
    monkeypatch.setattr(pretrain_module, "keep_freed_memory", lambda: calls.append(True) or True)
    settings = dict(preset="tiny", max_epochs=1, train=8, val=4, test=4, device="cpu")
    pretrain_module.pretrain(xtb_ethanol, pretrain_module.PretrainConfig(keep_freed_memory=False, **settings),
                             tmp_path / "off", progress=False)
    assert calls == []
    pretrain_module.pretrain(xtb_ethanol, pretrain_module.PretrainConfig(**settings), tmp_path / "on", progress=False)
    assert calls == [True]


def test_config_rejects_a_non_boolean():
    from openmm_stable.engine import EngineConfig
    from openmm_stable.training.pretrain import PretrainConfig

    with pytest.raises(ValueError, match="keep_freed_memory"):
        EngineConfig(keep_freed_memory="yes")
    with pytest.raises(ValueError, match="keep_freed_memory"):
        PretrainConfig(keep_freed_memory="yes")
