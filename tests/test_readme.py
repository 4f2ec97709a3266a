"""The README's Python examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first ```python block under a README heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_embed_the_runner_example_runs_against_the_emulator(emulator, tmp_path: Path) -> None:
    openai_key = emulator.new_key("openai", label="platform-openai")
    anthropic_key = emulator.new_key("anthropic", label="platform-anthropic")
    environ = {
        **os.environ,
        **emulator.environ(),
        "BYOK_HOME": str(tmp_path / "home"),
        "BYOK_PLATFORM_KEYS_OPENAI": openai_key,
        "BYOK_PLATFORM_KEYS_ANTHROPIC": anthropic_key,
    }
    done = subprocess.run(
        [sys.executable, "-c", readme_block("## Embed the runner in your own engine")],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert any(line.startswith("classify completed platform") for line in lines), done.stdout
    assert lines[-1].startswith("completed "), done.stdout
    assert openai_key not in done.stdout + done.stderr
    served = emulator.calls("openai", api_key=openai_key)
    assert served, "the emulator saw no call on the platform key"


def test_the_billing_plugin_example_charges_five_percent_of_list_price(isolated_home) -> None:
    from decimal import Decimal
    from types import ModuleType

    from byok_hookspecs import Charge, Credential, CredentialSource, Usage, hookimpl

    from byok_plugin import App, Settings, plugin_manager_for

    plugin = ModuleType("readme_fee_plugin")
    exec(readme_block("## Write a plugin that changes billing"), plugin.__dict__)
    app = App(Settings.from_environ({"BYOK_HOME": str(isolated_home)}))
    pm = plugin_manager_for(app, environ={"BYOK_LOAD_PLUGINS": "byok_plugin"})
    pm.register(plugin)
    usage = Usage(provider="openai", model="gpt-4o-mini", input_tokens=2_000_000)
    byok = Credential(api_key="k", provider="openai", source=CredentialSource.WORKSPACE)
    platform = Credential(api_key="k", provider="openai", source=CredentialSource.PLATFORM)

    charge = pm.hook.byok_compute_charge(usage=usage, credential=byok)
    assert charge.reason == "byok_fee"
    assert charge.list_cost > 0
    assert charge.amount == (charge.list_cost * Decimal("0.05")).quantize(Decimal("0.000001"))
    assert pm.hook.byok_compute_charge(usage=usage, credential=platform).reason == "platform"

    class Unpriced:  # a BYOK charge without a list cost must not break the example
        @hookimpl(trylast=True)
        def byok_compute_charge(self, usage, credential):
            return Charge(amount=Decimal(0), reason="byok")

    pm.unregister(name="byok_plugin")
    pm.register(Unpriced())
    assert pm.hook.byok_compute_charge(usage=usage, credential=byok).amount == 0
