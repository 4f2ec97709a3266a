"""The built-in authorization rule: members read, admins manage, the local operator does all."""

from __future__ import annotations

from byok_hookspecs import Action, Actor, Role

_MEMBER_ACTIONS = frozenset({Action.READ_KEYS, Action.USE_KEYS, Action.READ_USAGE})


def role_decision(actor: Actor | None, workspace_id: str, action: Action) -> bool | None:
    """Decide from the roles the host put on the actor.

    :returns: ``True`` to allow; ``False`` for a member asking for an admin's action; ``None``
        (no answer, so deny unless another plugin allows) for anyone outside the workspace.
    """
    if actor is None:
        return None
    if actor.operator:
        return True
    role = actor.role_in(workspace_id)
    if role is None:
        return None
    if action in _MEMBER_ACTIONS:
        return True
    if action is Action.MANAGE_KEYS:
        return role is Role.ADMIN
    return None
