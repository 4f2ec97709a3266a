"""Without the ``server`` extra (no starlette, no uvicorn) the ``byok`` command still works, and
the commands that need the extra say so."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# A fresh interpreter in which starlette and uvicorn cannot be imported, as after a plain
# `pip install byok-plugin`.
WITHOUT_SERVER_EXTRA = textwrap.dedent(
    """
    import sys
    from importlib.abc import MetaPathFinder

    class NotInstalled(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"starlette", "uvicorn"}:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    from byok_plugin.cli import main
    main(sys.argv[1:], prog_name="byok")
    """
)


def byok_without_server_extra(*args: str, home) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVER_EXTRA, *args],
        env={**os.environ, "BYOK_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "args", [["--help"], ["plugins"], ["keys", "list", "-w", "acme"], ["usage", "--json"]]
)
def test_the_command_works_without_the_server_extra(args, isolated_home) -> None:
    done = byok_without_server_extra(*args, home=isolated_home)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in (0, 1), done.stderr  # keys list: no master key yet is exit 1


@pytest.mark.parametrize(
    "args", [["demo"], ["serve"], ["emulator", "--accept-any-key", "--port", "0"]]
)
def test_commands_that_need_the_extra_say_how_to_get_it(args, isolated_home) -> None:
    done = byok_without_server_extra(*args, home=isolated_home)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert "pip install 'byok-plugin[server]'" in done.stderr
