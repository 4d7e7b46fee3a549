"""IAM users as credentials, and the mount's own access key rotation (blocking; run in threads)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from broker.backend import BackendError

if TYPE_CHECKING:
    from plugins.aws import AWSRole

__all__ = ["INLINE_POLICY_NAME", "LEASE_ID_TAG", "create_root_key", "create_user", "delete_key",
           "delete_user", "lease_tag"]

log = logging.getLogger(__name__)

#: the inline policy put on each user from the role's policy_document.
INLINE_POLICY_NAME = "broker-policy"
#: the tag naming the lease a user was made for (IAM users have no other link back).
LEASE_ID_TAG = "broker-lease-id"


def _missing(exc: ClientError) -> bool:
    return bool(exc.response.get("Error", {}).get("Code") == "NoSuchEntity")


def _ignore_missing(fn: Callable[..., Any], **kwargs: Any) -> None:
    try:
        fn(**kwargs)
    except ClientError as exc:
        if not _missing(exc):
            raise


class _GivenUp(Exception):
    """The issue that started a creation stopped waiting for it (timeout, cancel)."""


def _check(stop: Callable[[], bool] | None) -> None:
    if stop is not None and stop():
        raise _GivenUp


def lease_tag(tags: list[dict[str, str]]) -> str | None:
    """The ``broker-lease-id`` value among ``tags`` (None if absent)."""
    return next((t["Value"] for t in tags if t["Key"] == LEASE_ID_TAG), None)


def _each(iam: Any, op: str, key: str, **kwargs: Any) -> list[Any]:
    """All items of a paginated IAM list call (a missing user lists nothing)."""
    items: list[Any] = []
    try:
        for page in iam.get_paginator(op).paginate(**kwargs):
            items.extend(page.get(key, []))
    except ClientError as exc:
        if not _missing(exc):
            raise
    return items


def create_user(iam: Any, name: str, path: str, role: AWSRole, tags: list[dict[str, str]],
                stop: Callable[[], bool] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Create the user with its permissions and one access key: (client data, revocation).

    ``stop`` is asked between AWS calls: once it says true (the issue stopped
    waiting for this thread), the creation ends and deletes what it made, so
    a credential nobody will ever hold does not outlive the issue.
    """
    args: dict[str, Any] = {"UserName": name, "Path": path, "Tags": tags}
    if role.permissions_boundary_arn:
        args["PermissionsBoundary"] = role.permissions_boundary_arn
    if stop is not None and stop():
        raise BackendError("creating IAM user: the issue was given up before CreateUser",
                           retryable=True, created_nothing=True)
    try:
        user = iam.create_user(**args)["User"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "EntityAlreadyExists" \
                or _made_by(iam, name, tags):
            raise
        # Someone else's user (made by hand, or another live lease's when the
        # username_template has no {{random}}): the engine must not "roll back"
        # this issue by deleting it.
        raise BackendError(f"creating IAM user: EntityAlreadyExists: a user named {name} "
                           "exists already; it is not this lease's and is left alone "
                           "(check the role's username_template)",
                           retryable=False, created_nothing=True) from None
    try:
        for arn in role.policy_arns:
            _check(stop)
            iam.attach_user_policy(UserName=name, PolicyArn=arn)
        if role.policy_document:
            _check(stop)
            iam.put_user_policy(UserName=name, PolicyName=INLINE_POLICY_NAME,
                                PolicyDocument=role.policy_document)
        for group in role.iam_groups:
            _check(stop)
            iam.add_user_to_group(GroupName=group, UserName=name)
        _check(stop)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        _check(stop)
    except Exception as exc:
        # Do not leave a half-built (or given-up) user; if this fails too, the engine's
        # rollback retries.
        try:
            delete_user(iam, name, path)
        except Exception as cleanup:  # the original error is the one to report
            log.warning("cleaning up IAM user %s after a failed issue: %s", name,
                        type(cleanup).__name__)
        if isinstance(exc, _GivenUp):
            log.warning("IAM user %s: its issue gave up waiting; deleted what was made", name)
            raise BackendError("creating IAM user: the issue was given up; the user was "
                               "deleted again", retryable=True) from None
        raise
    data = {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"],
            "security_token": None, "arn": user["Arn"]}
    # The path is recorded: the mount's iam_path may change before the lease ends.
    revocation = {"credential_type": "iam_user", "username": name,
                  "access_key_id": key["AccessKeyId"], "iam_path": path}
    return data, revocation


def _made_by(iam: Any, name: str, tags: list[dict[str, str]]) -> bool:
    """Whether the existing user ``name`` is this issue's own (a retried CreateUser whose
    first attempt went through): it carries the same ``broker-lease-id`` tag."""
    mine = lease_tag(tags)
    try:
        user = iam.get_user(UserName=name)["User"]
    except ClientError:
        return False  # unknown: treat as not ours, never delete it
    theirs = {t.get("Key"): t.get("Value") for t in user.get("Tags", [])}
    return mine is not None and theirs.get(LEASE_ID_TAG) == mine


def delete_user(iam: Any, name: str, path: str,
                owns: Callable[[str | None], bool] | None = None, *,
                own_tag: str | None = None, created_path: str | None = None) -> bool:
    """Remove everything IAM requires gone first, then the user; a missing user is success.

    ``path`` is the mount's iam_path now. A user outside it is deleted only if it
    carries ``own_tag`` (the ending lease's ``broker-lease-id``) and, when the lease
    recorded one, sits in ``created_path`` (where the lease made it): the mount's
    iam_path changed since the issue. ``owns`` is given the user's
    ``broker-lease-id`` tag (None: untagged); when it says the user is not the
    deleting lease's, the user is left alone and False returned. True: deleted
    (or already gone).
    """
    try:
        user = iam.get_user(UserName=name)["User"]
    except ClientError as exc:
        if _missing(exc):
            return True
        raise
    tag = {t.get("Key"): t.get("Value") for t in user.get("Tags", [])}.get(LEASE_ID_TAG)
    where = user.get("Path")
    if where != path:
        # Revocation data comes from the store; never let it delete someone else's
        # user. Outside the mount's path only the lease's own tag proves the user is
        # the broker's: the tag names a lease id, which nobody else writes.
        moved = own_tag is not None and tag == own_tag and created_path in (None, where)
        if not moved:
            raise BackendError(f"refusing to delete IAM user {name}: its path {where} is "
                               f"outside the mount's iam_path {path} and it is not tagged "
                               f"{LEASE_ID_TAG} with the lease being ended", retryable=False)
    if owns is not None and not owns(tag):
        log.warning("IAM user %s carries %s=%s, not the lease being ended: left alone",
                    name, LEASE_ID_TAG, tag)
        return False
    for key in _each(iam, "list_access_keys", "AccessKeyMetadata", UserName=name):
        _ignore_missing(iam.delete_access_key, UserName=name, AccessKeyId=key["AccessKeyId"])
    for policy in _each(iam, "list_user_policies", "PolicyNames", UserName=name):
        _ignore_missing(iam.delete_user_policy, UserName=name, PolicyName=policy)
    for policy in _each(iam, "list_attached_user_policies", "AttachedPolicies", UserName=name):
        _ignore_missing(iam.detach_user_policy, UserName=name, PolicyArn=policy["PolicyArn"])
    for group in _each(iam, "list_groups_for_user", "Groups", UserName=name):
        _ignore_missing(iam.remove_user_from_group, UserName=name, GroupName=group["GroupName"])
    _ignore_missing(iam.delete_login_profile, UserName=name)
    # Nothing the broker adds, but IAM refuses to delete a user that still has them.
    for device in _each(iam, "list_mfa_devices", "MFADevices", UserName=name):
        _ignore_missing(iam.deactivate_mfa_device, UserName=name,
                        SerialNumber=device["SerialNumber"])
    for cert in _each(iam, "list_signing_certificates", "Certificates", UserName=name):
        _ignore_missing(iam.delete_signing_certificate, UserName=name,
                        CertificateId=cert["CertificateId"])
    for ssh in _each(iam, "list_ssh_public_keys", "SSHPublicKeys", UserName=name):
        _ignore_missing(iam.delete_ssh_public_key, UserName=name,
                        SSHPublicKeyId=ssh["SSHPublicKeyId"])
    _ignore_missing(iam.delete_user, UserName=name)
    return True


def create_root_key(iam: Any, current_key_id: str) -> tuple[str, str, str]:
    """A second access key for the mount's own IAM user: (user name, key id, secret)."""
    user = iam.get_user()["User"]["UserName"]
    keys = iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
    others = [k["AccessKeyId"] for k in keys if k["AccessKeyId"] != current_key_id]
    if others:
        raise BackendError(f"IAM user {user} already has a second access key ({others[0]}); "
                           "AWS allows two, delete the unused one before rotating",
                           retryable=False)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return user, key["AccessKeyId"], key["SecretAccessKey"]


def delete_key(iam: Any, user: str, key_id: str) -> None:
    _ignore_missing(iam.delete_access_key, UserName=user, AccessKeyId=key_id)
