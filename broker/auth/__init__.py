"""Auth methods: how a caller without a broker token gets one (``POST /v1/auth/NAME/login``).

Today there is one kind, JWT/OIDC (``[auth.jwt.NAME]``), for CI pipelines that
hold a token signed by their CI system (GitHub Actions, GitLab CI id_tokens).
"""

from __future__ import annotations

from broker.auth.jwt import (
    JWTAuthMethod,
    JWTReplayed,
    LoginResult,
    build_auth_methods,
    describe_token,
)
from broker.auth.jwt_config import (
    AuthConfigError,
    JWTMethodConfig,
    JWTRoleConfig,
    parse_jwt_methods,
)

__all__ = [
    "AuthConfigError",
    "JWTAuthMethod",
    "JWTMethodConfig",
    "JWTReplayed",
    "JWTRoleConfig",
    "LoginResult",
    "build_auth_methods",
    "describe_token",
    "parse_jwt_methods",
]
