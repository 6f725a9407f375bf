"""ISA detection and forcing: LATHE_ISA names, errors for unknown names and for levels the CPU
lacks, and force_isa's ladder."""
import os
import subprocess
import sys

import pytest

from lathe.kernels import cpu


def _run(env_isa: str | None, code: str):
    env = dict(os.environ)
    env.pop("LATHE_ISA", None)
    if env_isa is not None:
        env["LATHE_ISA"] = env_isa
    return subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), timeout=120)


PRINT_ACTIVE = "from lathe.kernels import cpu; print(cpu.active_isa())"


def test_best_isa_is_a_known_level_and_flags_back_it():
    best = cpu.best_isa()
    assert best in cpu.ISAS
    flags = cpu.cpu_flags().split()
    if cpu.ISAS[best] >= cpu.ISAS["avx512_vnni"]:
        assert "avx512_vnni" in flags
    if cpu.ISAS[best] >= cpu.ISAS["avx512_bf16"]:
        assert "avx512_bf16" in flags
    if best == "amx":
        assert {"amx_tile", "amx_int8", "amx_bf16"} <= set(flags)
    else:
        assert cpu.isa_missing("amx") is not None and "flags:" in cpu.isa_missing("amx")


@pytest.mark.parametrize("bad", ["AVX2", "foo", "avx-512"])
def test_unknown_lathe_isa_is_bad_input_naming_the_accepted_values(bad):
    r = _run(bad, PRINT_ACTIVE)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lathe.errors.BadInput: "), last
    assert f"LATHE_ISA={bad}" in last and "scalar, avx2, avx512" in last and "amx" in last


@pytest.mark.parametrize("name,level", [("scalar", "scalar"), ("avx2", "avx2"), ("avx512", "avx512_vnni"),
                                        ("avx512_bf16", "avx512_bf16"), ("amx", "amx")])
def test_lathe_isa_forces_a_level_or_names_what_the_cpu_lacks(name, level):
    r = _run(name, PRINT_ACTIVE)
    if cpu.isa_missing(level) is None:
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == level
    else:
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert "BadInput" in last and "this CPU lacks" in last and "flags:" in last, last


def test_bad_lathe_isa_exits_2_from_the_cli():
    r = _run("foo", "import sys; from lathe.cli import main; sys.exit(main(['bench', 'kernels', '--quick']))")
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert "LATHE_ISA=foo" in r.stderr


def test_force_isa_walks_the_ladder_and_refuses_levels_above_best():
    best = cpu.best_isa()
    for name, lvl in cpu.ISAS.items():
        if lvl <= cpu.ISAS[best]:
            with cpu.force_isa(name):
                assert cpu.active_isa() == name
        else:
            with pytest.raises(ValueError, match="this CPU lacks"):
                with cpu.force_isa(name):
                    pass
    assert cpu.active_isa() == best or os.environ.get("LATHE_ISA")
