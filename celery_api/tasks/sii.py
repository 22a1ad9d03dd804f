"""The SII sync tasks of the original module, and their catalog entries."""

from __future__ import annotations

from datetime import date

import marshmallow as ma
from celery import shared_task
from flask import current_app

from celery_api.catalog import Catalog
from celery_api.services.fanout import fan_out
from celery_api.tasks.sii_client import BOOKS, SIIClient, SIIUnavailable, load_client


class SyncDocumentsAllParamsSchema(ma.Schema):
    # strict: 2.5 and "2" are refused (the JSON Schema's "integer"), not truncated.
    months = ma.fields.Integer(
        strict=True, load_default=1, validate=ma.validate.Range(1, 12),
        metadata={"description": "How many months to sync, 1 to 12"})
    month_offset = ma.fields.Integer(
        strict=True, load_default=0, validate=ma.validate.Range(min=0, max=240),
        metadata={"description": "Months back from the current one to start at (0 = this month)"})


class SyncDocumentsParamsSchema(SyncDocumentsAllParamsSchema):
    company_id = ma.fields.UUID(required=True, metadata={"description": "Company to sync"})


def _current_year() -> str:
    return str(date.today().year)


def _year_pattern(last: int) -> str:
    """A regex of the years 2000 to ``last`` (documents the range in the JSON Schema)."""
    decade, unit = divmod(last - 2000, 10)
    parts = [f"{d}[0-9]" for d in range(decade)] + [f"{decade}[0-{unit}]"]
    return "^20(" + "|".join(parts) + ")$"


YEAR_PATTERN = _year_pattern(date.today().year)


def _validate_year(value: str) -> None:
    if not (len(value) == 4 and value.isascii() and value.isdigit()):  # not '٢٠٢٥'
        raise ma.ValidationError("Must be a year written as YYYY, e.g. '2025'.")
    if not 2000 <= int(value) <= date.today().year:
        raise ma.ValidationError(f"Must be between 2000 and {date.today().year}.")


class SyncF29AllParamsSchema(ma.Schema):
    year = ma.fields.String(
        load_default=_current_year, validate=_validate_year,
        metadata={"description": "Year as YYYY, from 2000 to the current one; defaults to "
                                 "the current year", "pattern": YEAR_PATTERN})


class SyncF29ParamsSchema(SyncF29AllParamsSchema):
    company_id = ma.fields.UUID(required=True, metadata={"description": "Company to sync"})


def client() -> SIIClient:
    extensions = current_app.extensions
    if "sii_client" not in extensions:
        extensions["sii_client"] = load_client(current_app.config)
    return extensions["sii_client"]


def periods(months: int, month_offset: int, today: date | None = None) -> list[str]:
    """``YYYYMM`` periods, newest first: ``months`` of them starting ``month_offset`` back."""
    today = today or date.today()
    index = today.year * 12 + today.month - 1 - month_offset
    return [f"{(index - i) // 12:04d}{(index - i) % 12 + 1:02d}" for i in range(months)]


def _retry_transient(task, exc: SIIUnavailable):
    config = current_app.config
    countdown = config["SII_RETRY_BACKOFF_SECONDS"] * (2 ** task.request.retries)
    return task.retry(exc=exc, countdown=countdown, max_retries=config["SII_MAX_RETRIES"])


@shared_task(bind=True, name="sii.sync_documents")
def sync_documents(self, company_id: str, months: int = 1, month_offset: int = 0) -> dict:
    sii = client()
    wanted = periods(months, month_offset)
    steps = len(wanted) * len(BOOKS)
    summary: dict = {"success": True, "company_id": str(company_id), "periods": wanted}
    done = 0
    try:
        for book in BOOKS:
            per_period = {}
            amount = 0
            for period in wanted:
                self.report_progress(done, steps, f"{book} {period}")
                page = sii.fetch_book(str(company_id), book, period, self.request.retries)
                per_period[period] = page["total"]
                amount += page["amount"]
                done += 1
            summary[book] = {"total": sum(per_period.values()), "period": wanted[0],
                             "by_period": per_period, "amount": amount}
    except SIIUnavailable as exc:
        raise _retry_transient(self, exc) from exc
    return summary


@shared_task(bind=True, name="sii.sync_documents_all_companies")
def sync_documents_all_companies(self, months: int = 1, month_offset: int = 0) -> dict:
    companies = client().list_companies()
    ready = [c for c in companies if c.get("has_credentials", True)]
    children = [{"company_id": c["id"], "months": months, "month_offset": month_offset}
                for c in ready]
    return fan_out(self, "sii.sync_documents", children,
                   total=len(companies), skipped=len(companies) - len(ready))


@shared_task(bind=True, name="sii.sync_f29")
def sync_f29(self, company_id: str, year: str | None = None) -> dict:
    year = year or _current_year()
    self.report_progress(0, 1, f"F29 {year}")
    try:
        f29 = client().fetch_f29(str(company_id), year, self.request.retries)
    except SIIUnavailable as exc:
        raise _retry_transient(self, exc) from exc
    return {"success": True, "company_id": str(company_id), "f29": f29}


@shared_task(bind=True, name="sii.sync_f29_all_companies")
def sync_f29_all_companies(self, year: str | None = None) -> dict:
    year = year or _current_year()
    companies = client().list_companies()
    ready = [c for c in companies if c.get("has_credentials", True)]
    children = [{"company_id": c["id"], "year": year} for c in ready]
    return fan_out(self, "sii.sync_f29", children,
                   total=len(companies), skipped=len(companies) - len(ready))


# The result cache (README, "Result caching"): an identical launch made while a sync is
# in flight, or shortly after one succeeded, is answered by that run. Documents of the
# current month keep arriving at SII during the day, so a documents sync answers for
# 5 minutes; F29 declarations are filed monthly, so an F29 sync answers for an hour.
DOCUMENTS_CACHE_TTL = 300
F29_CACHE_TTL = 3600


def register(catalog: Catalog) -> None:
    catalog.add(
        "sii.sync_documents", celery_name=sync_documents.name,
        params_schema=SyncDocumentsParamsSchema, name="Sync SII documents",
        description="Download the purchase (compras), sales (ventas) and fee (honorarios) "
                    "books of one company from SII for one or more months.",
        safe_to_repeat=True, cache_ttl=DOCUMENTS_CACHE_TTL)
    catalog.add(
        "sii.sync_documents_all_companies", celery_name=sync_documents_all_companies.name,
        params_schema=SyncDocumentsAllParamsSchema, name="Sync SII documents, all companies",
        description="Launch one sii.sync_documents run per company with SII credentials and "
                    "report {total_companies, synced, failed, skipped} when all have ended.",
        cache_ttl=DOCUMENTS_CACHE_TTL)
    catalog.add(
        "sii.sync_f29", celery_name=sync_f29.name,
        params_schema=SyncF29ParamsSchema, name="Sync SII F29",
        description="Download the F29 (monthly VAT) declarations of one company for a year.",
        safe_to_repeat=True, cache_ttl=F29_CACHE_TTL)
    catalog.add(
        "sii.sync_f29_all_companies", celery_name=sync_f29_all_companies.name,
        params_schema=SyncF29AllParamsSchema, name="Sync SII F29, all companies",
        description="Launch one sii.sync_f29 run per company with SII credentials and "
                    "report {total_companies, synced, failed, skipped} when all have ended.",
        cache_ttl=F29_CACHE_TTL)
