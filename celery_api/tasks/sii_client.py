"""The SII (Chilean tax service) client interface and its deterministic sandbox.

A deployment plugs in its real client with ``SII_CLIENT=package.module:ClassName``;
the class is built with the Flask config mapping and must implement ``SIIClient``.
The default, ``SandboxSIIClient``, talks to nothing: it derives every answer from
the company id and period, so the whole flow runs offline and repeatably.
"""

from __future__ import annotations

import hashlib
import importlib
import time
import uuid
from typing import Protocol

BOOKS = ("compras", "ventas", "honorarios")


class SIIError(Exception):
    """Base of the errors a client raises."""


class SIIUnavailable(SIIError):
    """SII did not answer (maintenance, timeout): transient, the task retries."""


class CompanyNotFound(SIIError):
    """SII does not know this company (or we hold no credentials for it): permanent."""


class SIIClient(Protocol):
    def list_companies(self) -> list[dict]:
        """Every company: ``{"id": str, "name": str, "has_credentials": bool}``."""

    def fetch_book(self, company_id: str, book: str, period: str, attempt: int) -> dict:
        """One book (compras/ventas/honorarios) of one month ``YYYYMM``."""

    def fetch_f29(self, company_id: str, year: str, attempt: int) -> dict:
        """The F29 declarations of one year."""


def _sandbox_id(n: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"celery-api-sandbox-company-{n}"))


class SandboxSIIClient:
    """Deterministic stand-in for SII. Clearly not the real service.

    Companies: five fixed ids (``SANDBOX_COMPANIES``); the fourth has no SII
    credentials (the fan-out skips it) and the fifth is "flaky": each of its
    calls fails with ``SIIUnavailable`` on the first two attempts, then succeeds.
    Any other id raises ``CompanyNotFound``. Each book takes
    ``SII_SANDBOX_STEP_SECONDS`` to "download".
    """

    COMPANIES = [
        {"id": _sandbox_id(1), "name": "Sandbox Comercial SpA", "has_credentials": True},
        {"id": _sandbox_id(2), "name": "Sandbox Servicios Ltda", "has_credentials": True},
        {"id": _sandbox_id(3), "name": "Sandbox Exportadora SA", "has_credentials": True},
        {"id": _sandbox_id(4), "name": "Sandbox Sin Credenciales SpA", "has_credentials": False},
        {"id": _sandbox_id(5), "name": "Sandbox Intermitente SpA", "has_credentials": True},
    ]
    FLAKY_ID = _sandbox_id(5)
    FLAKY_FAILURES = 2

    def __init__(self, config: dict | None = None):
        self.step_seconds = float((config or {}).get("SII_SANDBOX_STEP_SECONDS", 0.2))
        self._by_id = {c["id"]: c for c in self.COMPANIES}

    def list_companies(self) -> list[dict]:
        return [dict(c) for c in self.COMPANIES]

    def _check(self, company_id: str, attempt: int) -> None:
        company = self._by_id.get(str(company_id))
        if company is None:
            raise CompanyNotFound(f"company {company_id} is not registered with SII (sandbox)")
        if not company["has_credentials"]:
            raise CompanyNotFound(f"company {company_id} has no SII credentials configured")
        if company["id"] == self.FLAKY_ID and attempt < self.FLAKY_FAILURES:
            raise SIIUnavailable(f"SII sandbox is unavailable (attempt {attempt + 1})")

    @staticmethod
    def _number(*parts: str, modulo: int) -> int:
        digest = hashlib.sha256("|".join(parts).encode()).digest()
        return int.from_bytes(digest[:4], "big") % modulo

    def fetch_book(self, company_id: str, book: str, period: str, attempt: int) -> dict:
        self._check(company_id, attempt)
        if self.step_seconds:
            time.sleep(self.step_seconds)  # simulated network time of the real service
        total = self._number(company_id, book, period, modulo=300)
        amount = self._number(company_id, book, period, "amount", modulo=90_000_000)
        return {"total": total, "period": period, "amount": amount}

    def fetch_f29(self, company_id: str, year: str, attempt: int) -> dict:
        self._check(company_id, attempt)
        if self.step_seconds:
            time.sleep(self.step_seconds)
        months = [f"{year}{m:02d}" for m in range(1, 13)]
        filed = [m for m in months if self._number(company_id, m, "f29", modulo=10) > 0]
        return {"year": year, "declarations": len(filed), "periods": filed}


SANDBOX_COMPANIES = [c["id"] for c in SandboxSIIClient.COMPANIES]


def load_client(config: dict) -> SIIClient:
    """Build the client named by ``SII_CLIENT`` (``module:Class``)."""
    path = config.get("SII_CLIENT") or "celery_api.tasks.sii_client:SandboxSIIClient"
    module_name, _, class_name = path.partition(":")
    if not class_name:
        raise ValueError(f"SII_CLIENT must look like 'package.module:ClassName', got {path!r}")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config)
