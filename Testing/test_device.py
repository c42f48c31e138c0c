"""Which bf16 matrix instructions the CPU has: read from a cpuinfo file, named in benchmark reports."""

from HFSAMCore.bench.common import machine_info
from HFSAMCore.bench.report import machine_line
from HFSAMCore.runtime.device import cpu_bf16_instructions

CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512f {extra}\n\nprocessor\t: 1\n"


def write_cpuinfo(tmp_path, extra: str) -> str:
    path = tmp_path / f"cpuinfo_{len(extra)}"
    path.write_text(CPUINFO.format(extra=extra))
    return str(path)


def test_amx_and_avx512_bf16_are_named(tmp_path):
    assert cpu_bf16_instructions(write_cpuinfo(tmp_path, "avx512_bf16 amx_tile amx_bf16")) == (
        "AMX-BF16",
        "AVX512-BF16",
    )
    assert cpu_bf16_instructions(write_cpuinfo(tmp_path, "avx512_bf16")) == ("AVX512-BF16",)


def test_no_bf16_flag_and_no_cpuinfo_mean_none(tmp_path):
    assert cpu_bf16_instructions(write_cpuinfo(tmp_path, "avx2 amx_tile")) == ()
    assert cpu_bf16_instructions(str(tmp_path / "absent")) == ()


def test_benchmark_report_says_which_bf16_instructions_the_machine_had():
    machine = {"cpu": "Xeon", "threads": 2, "torch": "2.14.1", "cpu_capability": "AVX512", "device": "cpu"}
    line = machine_line({**machine, "bf16_instructions": "AMX-BF16, AVX512-BF16"})
    assert line.endswith("(AVX512; bf16 instructions: AMX-BF16, AVX512-BF16), device cpu")
    assert "bf16 instructions: ?" in machine_line(machine)  # a result file from before the field


def test_machine_info_reads_this_machine():
    import torch

    expected = ", ".join(cpu_bf16_instructions()) or "none"
    assert machine_info(torch.device("cpu"))["bf16_instructions"] == expected
