"""FLAGS.md is every script's --help, verbatim; `python tests/test_docs.py` rewrites it after a flag changes."""
import os
import re
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


if __name__ == "__main__":
    with open(os.path.join(ROOT, "FLAGS.md"), "w") as fh:
        fh.write(render())
