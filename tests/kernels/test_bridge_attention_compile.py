"""Every autotuning candidate of the three Triton bridge attention kernels compiled ahead of time for sm_80 and sm_90a
(no GPU needed): bf16, causal, head dims 64 and 128, MHA without padding and GQA with key padding. Each compilation
must fit the register file without spilling (ptxas, the one bundled with Triton, reports 0 bytes of spill stores),
stay within the architecture's shared memory per block, and keep the loads of every main loop software-pipelined
(asynchronous copies in the compiled loop). The document-mask variant (packed rows, ``HAS_DOC``) is compiled too,
with GQA and without key padding, as the model runs it (documents exclude padding, so it passes no padding mask).

Run as a script (``python tests/kernels/test_bridge_attention_compile.py``) it prints the table of registers, spills
and shared memory per candidate that bench/NOTES.md records.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_MEMORY_PER_BLOCK = {80: 166_912, 90: 232_448}  # bytes a block may have (opt-in maximum)
HEAD_DIMS = (64, 128)
VARIANTS = {"mha": dict(HEADS=32, KV_HEADS=32, HAS_PAD=False, HAS_DOC=False),
            "gqa+pad": dict(HEADS=32, KV_HEADS=8, HAS_PAD=True, HAS_DOC=False),
            "gqa+doc": dict(HEADS=32, KV_HEADS=8, HAS_PAD=False, HAS_DOC=True)}

# Runs in a process without TRITON_INTERPRET (the kernels must be built for a GPU): one JSON line per compilation.
COMPILE_ALL = r"""
import json, os, re, subprocess, sys, tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import sm_arch_from_capability

from libra_kernels.ops import bridge_attention_triton as kernels

TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "KB": "*bf16", "VB": "*bf16", "VIS": "*u8", "COUNTS": "*i32",
         "PAD": "*u8", "DSTART": "*i32", "DEND": "*i32", "LSE": "*fp32", "n_queries": "i32",
         "n_keys": "i32", "n_bucket": "i32", "scale": "fp64", "scale_log2": "fp64", "OUT": "*bf16", "DO": "*bf16",
         "DELTA": "*fp32", "DQ": "*bf16", "DK": "*bf16",
         "DV": "*bf16", "DKB": "*bf16", "DVB": "*bf16"}
FUNCTIONS = {"fwd": "_bridge_fwd_kernel", "dq": "_bridge_dq_kernel", "dkdv": "_bridge_dkdv_kernel"}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def main_loops(ttgir):
    # [asynchronous copies, synchronous 2-D loads] inside each scf.for that holds a matrix product (nested loops
    # count for the loops around them too).
    loops, stack, depth = [], [], 0
    for line in ttgir.splitlines():
        for body in stack:
            body[0] += "async_copy_global_to_local" in line
            body[1] += bool(re.search(r"= tt\.load .*tensor<\d+x\d+x", line))
            body[2] |= "tt.dot " in line or "warp_group_dot " in line
        if "scf.for" in line and line.rstrip().endswith("{"):
            stack.append([0, 0, False, depth])
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1][3]:
            done = stack.pop()
            if done[2]:
                loops.append(done[:2])
    return loops


def compile_one(job):
    kernel, capability, dim, variant, constants, blocks = job
    fn = getattr(kernels, FUNCTIONS[kernel]).fn
    config = kernels._config(tuple(blocks))
    values = dict(constants, HEAD_DIM=dim, BLOCK_D=dim, CAUSAL=True, UPCAST=False, ACC=tl.float32,
                  PRECISION="tf32", WITH_DQ=True, **config.kwargs)
    signature = {arg: TYPES.get(arg, "constexpr") for arg in fn.arg_names}
    constexprs = {arg: value for arg, value in values.items() if arg in fn.arg_names}
    # As a launch with 16-byte aligned tensors specialises: aligned pointers make the loads vectorisable.
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names) if signature[arg][0] == "*"}
    compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                                        attrs=attrs),
                              target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    # ptxas again on Triton's PTX with Triton's options, for its verbose report (Triton keeps only the cubin).
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([PTXAS, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                                 source, "-o", os.path.join(folder, "kernel.o")],
                                capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(re.search(pattern, report).group(1))  # noqa: E731
    return dict(kernel=kernel, capability=capability, dim=dim, variant=variant, blocks=blocks,
                registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), shared=compiled.metadata.shared,
                loops=main_loops(compiled.asm["ttgir"]))


jobs = json.loads(sys.argv[1])
with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
    for result in pool.map(compile_one, jobs):
        print(json.dumps(result), flush=True)
"""


def _jobs():
    from libra_kernels.ops import bridge_attention_triton as kernels

    return [(kernel, arch, dim, variant, constants, list(kernels._blocks(config)))
            for arch in kernels.ARCHITECTURES for kernel in kernels.KERNELS
            for config in kernels.candidate_configs(kernel, arch)
            for dim in HEAD_DIMS for variant, constants in VARIANTS.items()]


def compile_all() -> list[dict]:
    """Compile every (kernel, architecture, candidate, head dim, variant) in a fresh process; a dict per compilation."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", COMPILE_ALL, json.dumps(_jobs())], env=env, capture_output=True,
                         text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def _name(result) -> str:
    m, n, warps, stages = result["blocks"]
    return (f"{result['kernel']} sm_{result['capability']} d{result['dim']} {result['variant']} "
            f"({m}, {n}, {warps} warps, {stages} stages)")


@pytest.fixture(scope="module")
def compilations():
    return compile_all()


def test_every_candidate_is_compiled(compilations):
    assert len(compilations) == len(_jobs()) > 0


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("capability", [80, 90])
def test_shared_memory_and_pipelined_loads(compilations, kernel, capability):
    """Shared memory within the block limit; every loop with matrix products has its operand tiles (k and v in the
    forward and dq loops, q and dO in the dk/dv loop) loaded by asynchronous copies, i.e. software-pipelined."""
    results = [r for r in compilations if r["kernel"] == kernel and r["capability"] == capability]
    assert results
    for result in results:
        assert result["shared"] <= SHARED_MEMORY_PER_BLOCK[capability], (
            f"{_name(result)}: {result['shared']} bytes of shared memory, more than a block has")
        assert result["loops"], f"{_name(result)}: no main loop found in the compiled kernel"
        for async_copies, _ in result["loops"]:
            assert async_copies >= 2, f"{_name(result)}: a main loop's operand loads are not pipelined"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_no_spills(compilations, kernel, capability, dim, variant):
    results = [r for r in compilations if (r["kernel"], r["capability"], r["dim"], r["variant"]) ==
               (kernel, capability, dim, variant)]
    assert results
    spilling = [f"{_name(r)}: {r['registers']} registers, {r['spill_stores']} bytes spill stores"
                for r in results if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "\n".join(spilling)


if __name__ == "__main__":
    print("| kernel | arch | head dim | heads | (BLOCK_M, BLOCK_N, warps, stages) | registers | spill stores / loads "
          "(bytes) | shared memory (bytes) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in compile_all():
        print(f"| {r['kernel']} | sm_{r['capability']} | {r['dim']} | {r['variant']} | {tuple(r['blocks'])} | "
              f"{r['registers']} | {r['spill_stores']} / {r['spill_loads']} | {r['shared']:,} |")
