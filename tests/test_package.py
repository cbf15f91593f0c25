"""The distribution installs the card's folders as seqshard.* and nothing at the top level."""

import subprocess
import sys
import tempfile


def test_installs_as_seqshard_namespace_only():
    script = (
        "import importlib.util as u\n"
        "import seqshard.dist, seqshard.ops, seqshard.models, seqshard.launch\n"
        "bare = [m for m in ('dist', 'ops', 'models', 'launch') if u.find_spec(m) is not None]\n"
        "print('bare:', bare)\n"
    )
    # run from an unrelated folder so the checkout is not on sys.path
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True,
                             text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bare: []" in out.stdout
