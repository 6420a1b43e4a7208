"""FLAGS.md is every script's --help, verbatim; `python tests/test_docs.py` rewrites it after a flag changes."""
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train_inversionnet.py", "eval_inversionnet.py", "simulate_openfwi.py", "run.sh"]
FENCE = "`" * 3


def help_text(script):
    cmd = ["bash", script, "--help"] if script.endswith(".sh") else [sys.executable, script, "--help"]
    env = dict(os.environ, COLUMNS="110")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.rstrip("\n")


def render():
    parts = ["# Flags of every script (generated from --help)", ""]
    for s in SCRIPTS:
        parts += [f"## {s}", "", FENCE, help_text(s), FENCE, ""]
    return "\n".join(parts)


def test_flags_md_is_the_current_help_of_every_script():
    with open(os.path.join(ROOT, "FLAGS.md")) as fh:
        doc = fh.read()
    for s in SCRIPTS:
        m = re.search(rf"^## {re.escape(s)}\n\n{FENCE}\n(.*?)\n{FENCE}$", doc, flags=re.S | re.M)
        assert m, f"FLAGS.md has no section for {s}"
        assert m.group(1) == help_text(s), f"FLAGS.md is stale for {s}: run python tests/test_docs.py"
    # a flag unset by default has help that says what unset means; argparse's "(default: None)" would repeat it
    assert "(default: None)" not in doc and "(default: 0.0001)" in doc and "(default: flatvel)" in doc


def run_sh_arrays():
    """(name, flags) of each sim=(...) and train=(...) array in run.sh: each profile's flags for its stages."""
    with open(os.path.join(ROOT, "run.sh")) as fh:
        text = fh.read()
    return [(name, shlex.split(body)) for name, body in re.findall(r"^ *(sim|train)=\((.*?)\)$", text, flags=re.S | re.M)]


def test_every_run_sh_profile_gives_its_stages_flags_they_accept(tmp_path):
    """A GPU profile's flag only runs on a GPU machine: a typo or an out-of-range value there is caught here."""
    import simulate_openfwi as S
    import train_inversionnet as T
    for split in ("t.txt", "v.txt"):
        (tmp_path / split).write_text("")
    arrays = run_sh_arrays()
    assert sorted(name for name, _ in arrays) == ["sim", "sim", "train", "train"]  # the gpu and the cpu profile
    for name, flags in arrays:
        if name == "sim":
            S.check_args(S.get_args_parser().parse_args([*flags, "--out", str(tmp_path / "d")]))
        else:
            T.check_args(T.get_args_parser().parse_args([*flags, "--train-list", str(tmp_path / "t.txt"),
                                                         "--val-list", str(tmp_path / "v.txt"),
                                                         "--output-dir", str(tmp_path / "r"), "--resume", "auto"]))
    gpu = next(flags for name, flags in arrays if name == "train")  # the first train=(...) is the gpu profile's
    assert gpu[gpu.index("--lambda-l2") + 1] == "1" and gpu[gpu.index("--epochs") + 1] == "170"


if __name__ == "__main__":
    with open(os.path.join(ROOT, "FLAGS.md"), "w") as fh:
        fh.write(render())
