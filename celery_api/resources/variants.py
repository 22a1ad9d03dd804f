"""Request bodies that carry a task type and its params (a launch, a schedule), documented
as one variant per task type of the catalog, told apart by ``task_type``: a generated
client gets a typed ``params`` model for each task type."""

from __future__ import annotations


def register_task_type_variants(api, catalog, component: str, *, prefix: str,
                                description: str, variant_description: str,
                                properties: dict, required: tuple[str, ...] = (),
                                extra: dict | None = None) -> None:
    """Register ``component``: a ``oneOf`` of one ``<prefix><TaskType>`` schema per task
    type, with a ``task_type`` discriminator.

    Each variant has ``properties`` with ``task_type`` (the one value) and ``params``
    (``$ref`` of the task type's params schema) set in them: in their place where
    ``properties`` has those keys, before the others otherwise. It requires ``required``
    and ``task_type``, and ``params`` when a field of the params schema is required.
    ``variant_description`` is formatted with the definition (``{d.task_type}``);
    ``extra`` (more keywords of the schema) goes into each variant as it is.
    """
    components = api.spec.components
    if component in components.schemas:
        return
    if "task_type" not in properties:
        properties = {"task_type": None, "params": None, **properties}
    mapping = {}
    for definition in catalog:
        name = prefix + "".join(part.title() for part in
                                definition.task_type.replace(".", "_").split("_"))
        params_required = any(f.required for f in definition.params_schema().fields.values())
        components.schema(name, component={
            "type": "object",
            "description": variant_description.format(d=definition),
            "required": [*required, "task_type", *(["params"] if params_required else [])],
            "properties": {
                **properties,
                "task_type": {"type": "string", "enum": [definition.task_type]},
                "params": {"$ref": f"#/components/schemas/{definition.schema_name}"},
            },
            "additionalProperties": False,
            **(extra or {}),
        })
        mapping[definition.task_type] = f"#/components/schemas/{name}"
    components.schema(component, component={
        "description": description,
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "task_type", "mapping": mapping},
    })
