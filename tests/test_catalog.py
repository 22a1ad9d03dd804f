"""The catalog registry and how deployments extend it."""

from __future__ import annotations

import marshmallow as ma
import pytest

from celery_api.catalog import Catalog, CatalogError, load_catalog
from celery_api.tasks.sii import periods


class P(ma.Schema):
    x = ma.fields.Integer(required=True)


def test_builtin_and_external_modules_register():
    catalog = load_catalog(["acme_tasks"])
    assert [d.task_type for d in catalog] == [
        "acme.add", "acme.boom", "acme.count", "acme.count_cached", "acme.count_slowly",
        "acme.garble", "acme.sleep", "acme.sleep_safely", "acme.steps",
        "sii.sync_documents",
        "sii.sync_documents_all_companies",
        "sii.sync_f29", "sii.sync_f29_all_companies"]
    assert catalog.by_celery_name("acme.add").task_type == "acme.add"
    assert "acme.add" in catalog and len(catalog) == 13


def test_validate_returns_json_ready_params_with_defaults():
    definition = load_catalog([]).get("sii.sync_documents")
    company = "94d8658c-c8bf-58e5-aaca-c14fac456724"
    assert definition.validate({"company_id": company.upper()}) == {
        "company_id": company, "months": 1, "month_offset": 0}
    with pytest.raises(ma.ValidationError):
        definition.validate({"company_id": company, "extra": 1})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"task_type": "Bad Name"}, "lower_snake_case"),
    ({"task_type": "ok.name", "params_schema": dict}, "marshmallow Schema"),
    ({"task_type": "ok.name", "cache_ttl": 0}, "cache_ttl"),
    ({"task_type": "ok.name", "cache_ttl": 1.5}, "cache_ttl"),
    ({"task_type": "ok.name", "cache_ttl": 31 * 86400}, "cache_ttl"),
])
def test_invalid_registrations_are_refused(kwargs, message):
    catalog = Catalog()
    args = {"celery_name": "x", "params_schema": P, "name": "n", "description": "d", **kwargs}
    task_type = args.pop("task_type")
    with pytest.raises(CatalogError, match=message):
        catalog.add(task_type, **args)


def test_duplicate_task_type_is_refused():
    catalog = Catalog()
    catalog.add("a.b", celery_name="x", params_schema=P, name="n", description="d")
    with pytest.raises(CatalogError, match="twice"):
        catalog.add("a.b", celery_name="y", params_schema=P, name="n", description="d")


def test_unimportable_or_registerless_module_is_a_clear_error():
    with pytest.raises(CatalogError, match="cannot be imported"):
        load_catalog(["no_such_module_here"])
    with pytest.raises(CatalogError, match="no register"):
        load_catalog(["json"])


def test_periods_walk_back_across_years():
    from datetime import date

    assert periods(3, 0, date(2025, 2, 10)) == ["202502", "202501", "202412"]
    assert periods(1, 14, date(2025, 2, 10)) == ["202312"]
