"""Which environment variables a workflow's ``{"env": ...}`` block keys may read.

A workflow file is untrusted input: whoever can write one must not be able to make the runner
read the host's secrets (the master keyring, cloud credentials, the database URL) and send them to
a provider's base URL, nor run on the platform's own keys as a free "block" key. So a runner reads
no environment variable for a block unless its operator allowed it (:class:`EnvKeyAllowance`);
the runner embedded in a server has no allowance and refuses every ``env`` reference. Blocks of
such hosts choose a key by the label of a stored key instead (``{"label": ...}``).

Even when allowed, a variable is refused when it

- starts with ``BYOK_`` (byok's own configuration: keyring, database, platform key pools);
- is named like a platform key pool's variable (``*_API_KEY``, ``*_API_KEY_<n>``);
- holds one of the platform's keys (whatever its name), as ``reserved`` says.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from byok_plugin.host.workflow import AgentBlock, KeyRef, Problem, ToolBlock, Workflow, json_path

__all__ = ["ENV_ALLOW_VARIABLE", "EnvKeyAllowance", "env_key_problems", "env_key_refusal"]

#: the operator's comma-separated list of variable-name prefixes block keys may be read from
ENV_ALLOW_VARIABLE = "BYOK_BLOCK_KEY_ENV_ALLOW"

# the names platform key pools read: OPENAI_API_KEY, OPENAI_API_KEY_2, GEMINI_API_KEY...
_POOL_NAME = re.compile(r"^[A-Za-z0-9_]*_API_KEY(_[0-9]+)?$", re.IGNORECASE)


def _never(value: str) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class EnvKeyAllowance:
    """The operator's permission for ``{"env": ...}`` block keys, for a local, single-user run.

    :param prefixes: a variable may be read when its name starts with one of these (a full name
        allows that variable, and any longer name that starts with it).
    :param reserved: ``True`` for a value a block may never use as its own key (the platform's
        keys).
    """

    prefixes: tuple[str, ...]
    reserved: Callable[[str], bool] = field(default=_never, compare=False)

    def __repr__(self) -> str:
        return f"EnvKeyAllowance(prefixes={self.prefixes!r})"

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str], *, reserved: Callable[[str], bool] = _never
    ) -> EnvKeyAllowance | None:
        """The allowance ``BYOK_BLOCK_KEY_ENV_ALLOW`` grants, or ``None`` when it is unset or
        empty (the default: no ``env`` block key is read)."""
        prefixes = tuple(
            p.strip() for p in environ.get(ENV_ALLOW_VARIABLE, "").split(",") if p.strip()
        )
        return cls(prefixes, reserved) if prefixes else None

    def refusal(self, name: str, environ: Mapping[str, str]) -> str | None:
        """Why the block key in variable ``name`` may not be used, or ``None`` when it may."""
        if name.upper().startswith("BYOK_"):
            return (
                f"environment variable {name} is byok's own configuration and is never read as a "
                f"block's key"
            )
        if _POOL_NAME.match(name):
            return (
                f"environment variable {name} is where platform keys are read from (*_API_KEY, "
                f"*_API_KEY_<n>) and is never read as a block's key"
            )
        if not any(name.startswith(p) for p in self.prefixes):
            return (
                f"environment variable {name} is not allowed for block keys: "
                f"{ENV_ALLOW_VARIABLE} allows names starting with {', '.join(self.prefixes)}"
            )
        value = environ.get(name, "").strip()
        if not value:
            return f"environment variable {name} is not set: the block's own key is read from it"
        if self.reserved(value):
            return (
                f"environment variable {name} holds one of the platform's keys; a block may not "
                f"use a platform key as its own"
            )
        return None


def env_key_refusal(
    name: str, allowance: EnvKeyAllowance | None, environ: Mapping[str, str]
) -> str | None:
    """Why a block may not read its key from variable ``name`` here, or ``None`` when it may
    (``allowance`` ``None``: no variable may be read)."""
    if allowance is None:
        return (
            f"this runner reads no block key from the environment (a workflow may not name a "
            f'variable of the host, here {name}): name a key the workspace stored, {{"label": '
            f'"..."}}, or, for a local byok run, allow the variable in {ENV_ALLOW_VARIABLE}'
        )
    return allowance.refusal(name, environ)


def env_key_problems(
    workflow: Workflow, allowance: EnvKeyAllowance | None, environ: Mapping[str, str]
) -> list[Problem]:
    """Every ``{"env": ...}`` block key of ``workflow`` that may not be read here, at its JSON
    path (``$.blocks.ID.key.env``, ``$.blocks.ID.tools[N].key.env``)."""
    refs: list[tuple[tuple[str | int, ...], KeyRef | None]] = []
    for block in workflow.blocks.values():
        base: tuple[str | int, ...] = ("blocks", block.id)
        if isinstance(block, AgentBlock | ToolBlock):
            refs.append(((*base, "key"), block.key))
        if isinstance(block, AgentBlock):
            refs += [((*base, "tools", i, "key"), t.key) for i, t in enumerate(block.tools)]
    problems = []
    for parts, ref in refs:
        if ref is not None and ref.env is not None:
            why = env_key_refusal(ref.env, allowance, environ)
            if why:
                problems.append(Problem(json_path((*parts, "env")), why))
    return problems
