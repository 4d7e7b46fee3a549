"""docs/aws.md's IAM policy lists exactly the actions the least-privilege conformance run grants.

The conformance suite proves those actions are enough (``aws-least-privilege``);
this keeps the policy operators copy from the docs the same list.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conformance.aws_harness import (
    LEASE_GROUP_ACTIONS,
    LEASE_USER_ACTIONS,
    ROTATE_ROOT_ACTIONS,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "aws.md"


def test_the_documented_policy_is_the_tested_one() -> None:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), re.DOTALL)
    policies = [json.loads(b) for b in blocks if '"Sid": "LeaseUsers"' in b]
    assert len(policies) == 1, "docs/aws.md should hold one iam_user policy"
    by_sid = {st["Sid"]: st for st in policies[0]["Statement"]}
    assert set(by_sid) == {"HealthCheck", "LeaseUsers", "LeaseGroups", "RotateRoot"}
    assert by_sid["HealthCheck"]["Action"] == "sts:GetCallerIdentity"
    assert sorted(by_sid["LeaseUsers"]["Action"]) == sorted(LEASE_USER_ACTIONS)
    assert sorted(by_sid["LeaseGroups"]["Action"]) == sorted(LEASE_GROUP_ACTIONS)
    assert sorted(by_sid["RotateRoot"]["Action"]) == sorted(ROTATE_ROOT_ACTIONS)
    assert by_sid["LeaseUsers"]["Resource"].endswith(":user/broker/*")
