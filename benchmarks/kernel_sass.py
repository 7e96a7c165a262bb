"""Compile the HeadQ decode kernel for an H100 (sm_90) without a GPU; print its resources and main loop.

Triton compiles for any target on a CPU machine, and its wheel ships ptxas and cuobjdump, so registers,
spills, shared memory and the instruction mix of the token loop can be read here, at no device time,
before a change is timed on the GPU. Settings: the benchmark's (Llama-3-8B shapes, K2 r16 s4/block V2,
bf16) and the library's launch settings, or ``--set key=value`` overrides, with the integer and alignment
specialisations Triton gives that launch on the GPU (without them loads are neither vectorised nor made
asynchronous, and the count is not the device's). Prefer the GPU machine's Triton (3.6.0 on the H100s here;
``pip install --target DIR triton==3.6.0`` and put DIR first on PYTHONPATH): for the one-warp kernel 3.6.0 gives
2029 loop instructions and 3.9.0 2003, both with asynchronous copies and 255 registers. Instruction counts did
not predict GPU time for the variants measured (benchmarks/records/kernel-ab-h100.txt): time them on the GPU.

    python benchmarks/kernel_sass.py [--set tile=32 --set num_warps=4] [--sass PATH]
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import transformers_headq.kernels as kernels
from transformers_headq.kernels.decode import headq_decode_kernel

POINTERS = {
    "q_ptr": "*bf16", "w_ptr": "*fp32", "kc_ptr": "*u8", "ks_ptr": "*fp16", "kz_ptr": "*fp16", "cc_ptr": "*u8",
    "cs_ptr": "*fp16", "cz_ptr": "*fp16", "vc_ptr": "*u8", "vs_ptr": "*fp16", "vz_ptr": "*fp16",
    "wk_ptr": "*bf16", "wv_ptr": "*bf16", "sk_ptr": "*bf16", "valid_ptr": "*fp32", "lengths_ptr": "*i64",
    "m_ptr": "*fp32", "l_ptr": "*fp32",
    "acc_ptr": "*fp32",
}  # fmt: skip
FLOATS = {"scaling", "softcap"}
# Integer arguments as the benchmark's 32k x 8 launch passes them (contiguous stores with room for 32768 + 4096
# tokens, a query transposed from [B, 1, Hq, D]): Triton specialises those equal to 1 into constants and marks
# those divisible by 16 (and all pointers: torch allocates 16-byte aligned) so that loads can be vectorised and
# made asynchronous; without these hints the SASS is not the device's.
_TOKENS = 36864
INTS = {
    "n_tokens": 32768, "n_window": 5, "tokens_per_split": 512, "s_qb": 4096, "s_qh": 128,
    "s_kc_b": 8 * _TOKENS * 32, "s_kc_h": _TOKENS * 32, "s_kc_t": 32,
    "s_ks_b": 8 * _TOKENS * 2, "s_ks_h": _TOKENS * 2, "s_ks_t": 128,
    "s_cc_b": 8 * _TOKENS * 8, "s_cc_h": _TOKENS * 8, "s_cs_b": 8 * _TOKENS // 4, "s_cs_h": _TOKENS // 4, "s_cs_t": 16,
    "s_vc_b": 8 * _TOKENS * 32, "s_vc_h": _TOKENS * 32, "s_vc_t": 32, "s_vs_b": 8 * _TOKENS, "s_vs_h": _TOKENS,
    "s_vs_t": 1, "s_wk_b": 8 * 64 * 128, "s_wk_h": 64 * 128, "s_wk_t": 128, "s_wv_b": 8 * 64 * 128,
    "s_wv_h": 64 * 128, "s_wv_t": 128, "s_valid_b": 0, "n_sinks": 1, "s_sk_b": 8 * 128, "s_sk_h": 128, "s_sk_t": 128,
}  # fmt: skip
CONSTEXPRS = {
    "H_KV": 8, "G": 4, "D": 128, "R": 16, "SIDE_BYTES": 8, "SIDE_NB": 16, "KEY_BITS": 2,
    "SIDE_BITS": 4, "SIDE_PER_TOKEN": False, "VALUE_BITS": 2, "BLOCK_N": 64, "HAS_MASK": False, "SOFTCAP": False,
    "DEVICE_LENGTHS": False, "OP_DTYPE": tl.bfloat16, "HAS_SINKS": True,  # one sink key: the library's default
}  # fmt: skip


def compile_decode_kernel(launch: dict[str, int]):  # type: ignore[no-untyped-def]
    """The compiled kernel for sm_90 with ``launch`` settings (tile, warps, stages, asm, maxnreg)."""
    block_g = max(launch["min_rows"], triton.next_power_of_2(CONSTEXPRS["G"]))
    constexprs = {**CONSTEXPRS, "BLOCK_G": block_g, "TILE": launch["tile"], "ASM": bool(launch["asm"])}
    kernel = headq_decode_kernel
    unspecialised = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    signature, attrs = {}, {}
    for index, name in enumerate(headq_decode_kernel.arg_names):
        value = INTS.get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif name not in unspecialised and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = POINTERS.get(name, "fp32" if name in FLOATS else "i32")
            if name in POINTERS or (name not in unspecialised and value is not None and value % 16 == 0):
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=headq_decode_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]}
    if launch["maxnreg"]:
        options["maxnreg"] = launch["maxnreg"]
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump FLAG`` of a cubin, with the binary Triton's wheel ships."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> list[str]:
    """Instructions of the longest backward branch's body: the loop over the split's tokens."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for address, text in lines:
        jump = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < address:
            loops.append((int(jump.group(1), 16), address))
    start, end = max(loops, key=lambda span: span[1] - span[0])
    return [text for address, text in lines if start <= address <= end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="a launch setting, key=value (int)")
    parser.add_argument("--sass", type=Path, help="write the whole SASS here")
    args = parser.parse_args()
    launch = dict(kernels.LAUNCH)
    for item in args.set:
        key, value = item.split("=")
        launch[key] = int(value)
    compiled = compile_decode_kernel(launch)
    sass = cuobjdump(compiled.asm["cubin"], "-sass")
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", cuobjdump(compiled.asm["cubin"], "-res-usage"))
    assert usage is not None, "cuobjdump printed no resource usage"
    if args.sass:
        args.sass.write_text(sass)
    loop = main_loop(sass)
    mix = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for text in loop)
    print(f"launch {launch}: Triton {triton.__version__}, sm_90")
    registers, stack, _, local = usage.groups()
    print(f"registers {registers}, stack {stack} B, local (spills) {local} B, shared {compiled.metadata.shared} B")
    print(f"token loop: {len(loop)} instructions per warp and tile")
    print(", ".join(f"{name} {count}" for name, count in mix.most_common(24)))


if __name__ == "__main__":
    main()
