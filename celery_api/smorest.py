"""Project base classes for flask-smorest: the ``Api`` that speaks RFC 9457, and the
``Schema`` every request schema derives from.

Every error, whether raised with ``abort`` in a view, by webargs on a bad request
or by Flask itself (404, 405, 413, the 500 of an unhandled exception), leaves through
``Api.handle_http_exception`` as ``application/problem+json`` with a ``detail`` a
person can act on. Service errors, database errors and the request hooks are handled
beside it, in ``celery_api.http``, with the same ``problem_response``.

``Schema`` refuses, before any field is read, text no database can store: the NUL
character (PostgreSQL refuses it in text and JSON, and it truncates C strings) and
lone UTF-16 surrogates (JSON's ``"\\ud800"``, which cannot be encoded as UTF-8), in
any string or key of the input, at any depth (a task's ``params`` included). The
answer is a 422 naming the field path, never a 500 or a 503 from the database.
"""

from __future__ import annotations

import functools
import http
from collections.abc import Mapping
from json import JSONDecodeError
from urllib.parse import quote

import marshmallow as ma
from flask import Response, current_app, json, request
from flask_smorest import Api as BaseApi
from flask_smorest import Blueprint as BaseBlueprint
from flask_smorest import abort
from flask_smorest.utils import prepare_response
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import HTTPException
from werkzeug.routing import WebsocketMismatch

PROBLEM_JSON = "application/problem+json"


NUL_MESSAGE = "Must not contain the NUL character (\\u0000)."
SURROGATE_MESSAGE = ("Must be valid Unicode: a lone surrogate (\\ud800 to \\udfff) cannot be "
                     "stored.")
KEY_NUL_MESSAGE = "Names must not contain the NUL character (\\u0000)."
KEY_SURROGATE_MESSAGE = "Names must be valid Unicode: a lone surrogate cannot be stored."
MAX_TEXT_ERRORS = 20
MAX_ERROR_DEPTH = 32  # deeper paths are named by their first 32 parts
# Fields listed in a problem's errors, per level: a batch's items (1,000) each named.
MAX_ERROR_FIELDS = 1000
MAX_DETAIL_LINES = 5  # field messages repeated in a problem's detail


def _text_problem(value: str, nul: str, surrogate: str) -> str | None:
    if "\x00" in value:
        return nul
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return surrogate
    return None


def printable_name(key) -> object:
    """A key as it may be shown in an error: NUL and surrogates written as escapes."""
    if not isinstance(key, str):
        return key
    return key.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\u0000")


def unstorable_text(data) -> dict | list | None:
    """Field errors for every string (or key) in ``data`` that holds NUL or a lone
    surrogate, shaped as marshmallow's (``{"params": {"tags": {0: [...]}}}``), or None.

    Iterative (JSON nested to just under the recursion limit is read fine); stops after
    ``MAX_TEXT_ERRORS`` messages and names a path by its first ``MAX_ERROR_DEPTH`` parts,
    so a hostile body does not make a huge answer.
    """
    found: list[tuple[tuple, str]] = []
    stack: list[tuple[tuple, object]] = [((), data)]
    while stack and len(found) < MAX_TEXT_ERRORS:
        path, value = stack.pop()
        if isinstance(value, str):
            problem = _text_problem(value, NUL_MESSAGE, SURROGATE_MESSAGE)
            if problem:
                found.append((path, problem))
        elif isinstance(value, Mapping):
            children = []
            for key in value:
                if isinstance(key, str):
                    problem = _text_problem(key, KEY_NUL_MESSAGE, KEY_SURROGATE_MESSAGE)
                    if problem:
                        found.append(((*path, printable_name(key)), problem))
                        continue
                children.append(((*path, key), value[key]))
            stack.extend(reversed(children))  # reported in the input's order
        elif isinstance(value, list | tuple):
            stack.extend(reversed([((*path, index), item) for index, item in enumerate(value)]))
    if not found:
        return None
    if found[0][0] == ():
        return [found[0][1]]  # the input itself is one bad string
    errors: dict = {}
    for path, message in found:
        path = path[:MAX_ERROR_DEPTH]
        node = errors
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node.setdefault(path[-1], []).append(message)
    return errors


class Schema(ma.Schema):
    """The base of every schema of this API.

    Loading refuses (422, naming the field path) NUL characters and lone surrogates
    anywhere in the input: in any string or key, nested at any depth.
    """

    @ma.pre_load
    def _refuse_unstorable_text(self, data, **_kwargs):
        errors = unstorable_text(data)
        if errors:
            raise ma.ValidationError(errors)
        return data


class RequestSchema(Schema):
    """A schema of what clients send (body, query): its free strings are documented
    with ``NO_NUL_PATTERN`` in the OpenAPI document, which response schemas are not
    (a worker may record any text in a run's error). Its numbers sent as text are
    ASCII: Python's ``int()`` reads ``"１"`` (fullwidth) and ``"٢"`` (Arabic-Indic)."""

    @functools.cached_property
    def _number_fields(self) -> dict:
        """The number fields by the key they are sent under: once per schema instance,
        not per request (the launch path)."""
        return {field.data_key or name: field for name, field in self.load_fields.items()
                if isinstance(field, ma.fields.Number)}

    @ma.pre_load
    def _ascii_numbers(self, data, **_kwargs):
        if not isinstance(data, Mapping):
            return data
        errors = {key: [field.error_messages["invalid"]]
                  for key, field in self._number_fields.items()
                  if key in data and isinstance(data[key], str) and not data[key].isascii()}
        if errors:
            raise ma.ValidationError(errors)
        return data


# The NUL rule as OpenAPI can say it. Lone surrogates cannot be said: without the
# regex "u" flag a surrogate range would refuse every emoji too (README).
NO_NUL_PATTERN = "^[^\\u0000]*$"


def document_no_nul(converter, field, ret=None, **_kwargs) -> dict:
    """apispec attribute function: a request's free string says it holds no NUL.

    Request schemas are this project's ``RequestSchema`` subclasses and the task types'
    params schemas (plain marshmallow schemas, loaded only). Strings that already have
    a ``pattern``, a ``format`` or an ``enum`` say more than this and are left alone.
    """
    ret = ret or {}
    root = field.root
    is_request = isinstance(root, RequestSchema) or not isinstance(root, Schema)
    if (is_request and ret.get("type") == "string"
            and not {"pattern", "format", "enum"} & ret.keys()):
        return {"pattern": NO_NUL_PATTERN}
    return {}


def document_component(converter, field, ret=None, **_kwargs) -> dict:
    """apispec attribute function: a field with ``metadata["component"] = (name, schema)``
    is documented as ``$ref`` to that component (registered on first use), e.g.
    ``TaskStatus``, so generated clients share one named enum."""
    component = field.metadata.get("component")
    if not component or ret is None:
        return {}
    name, schema = component
    if name not in converter.spec.components.schemas:
        converter.spec.components.schema(name, component=dict(schema))
    ret.clear()  # a $ref has no siblings in OpenAPI 3.0
    return {"$ref": f"#/components/schemas/{name}"}


def document_nullable(converter, field, ret=None, **_kwargs) -> dict:
    """apispec attribute function: every ``nullable`` has a ``type`` beside it.

    OpenAPI 3.0 ignores ``nullable`` without ``type`` and strict validators (ajv) refuse
    it. So a value of any type (``Raw(allow_none=True)``) is documented with no
    ``nullable`` (a schema without ``type`` admits null already), and a nullable nested
    object, which apispec writes as ``anyOf: [{type: object, nullable: true}, {$ref}]``
    (an untyped object to openapi-python-client, ``unknown`` to TypeScript generators),
    is written inline as ``{type: object, nullable: true, properties: ...}``: a typed
    model or ``null`` in every generator tried (README, "Generated clients").
    """
    if ret is None:
        return {}
    if "nullable" in ret and "type" not in ret:
        del ret["nullable"]
    any_of = ret.get("anyOf")
    if (isinstance(field, ma.fields.Nested) and field.allow_none and isinstance(any_of, list)
            and {"type": "object", "nullable": True} in any_of and len(any_of) == 2):
        del ret["anyOf"]
        inline = converter.schema2jsonschema(field.schema)
        return {**inline, "type": "object", "nullable": True}
    return {}


class ProblemSchema(Schema):
    """RFC 9457 problem details, as every error of this API is answered."""

    # type, title, status and detail are in every problem, also those nginx and the
    # gunicorn edge write; instance (the request path) only in the app's.
    type = ma.fields.String(
        required=True,
        metadata={"description": "URI of the problem type ('about:blank' when generic)"}
    )
    title = ma.fields.String(required=True, metadata={"description": "HTTP status phrase"})
    status = ma.fields.Integer(required=True, metadata={"description": "HTTP status code"})
    detail = ma.fields.String(
        required=True, metadata={"description": "What went wrong, in words a person can act on"}
    )
    instance = ma.fields.String(metadata={"description": "The request path"})
    errors = ma.fields.Dict(
        metadata={
            "description": "Field-level messages (422): location, then field path, then messages"
        }
    )


def _flatten(errors, prefix: str = "") -> list[str]:
    """Turn marshmallow's nested error dict into 'path: message' lines."""
    lines: list[str] = []
    if isinstance(errors, dict):
        for key, value in errors.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            lines.extend(_flatten(value, path))
    elif isinstance(errors, list | tuple):
        for item in errors:
            if isinstance(item, dict | list | tuple):
                lines.extend(_flatten(item, prefix))
            else:
                lines.append(f"{prefix}: {item}" if prefix else str(item))
    else:
        lines.append(f"{prefix}: {errors}" if prefix else str(errors))
    return lines


def validation_detail(errors: dict) -> str:
    # webargs nests messages under their location ("json", "query", ...): drop it.
    if len(errors) == 1:
        (location, inner), = errors.items()
        if location in ("json", "query", "path", "headers", "form") and isinstance(inner, dict):
            errors = inner
    return "Invalid request: " + joined_lines(_flatten(errors))


def joined_lines(lines: list[str], total: int | None = None) -> str:
    """The first ``MAX_DETAIL_LINES`` field messages, and how many more there are
    (``total``: how many there are, when ``lines`` holds only the first ones)."""
    shown = "; ".join(lines[:MAX_DETAIL_LINES])
    more = (len(lines) if total is None else total) - MAX_DETAIL_LINES
    return shown + (f" (and {more} more)" if more > 0 else "")


def bounded_errors(errors):
    """``errors`` with at most ``MAX_ERROR_FIELDS`` entries at each level (the first
    ones): a body with 100,000 unknown keys gets a short answer, not megabytes."""
    if isinstance(errors, Mapping):
        items = list(errors.items())
        return {key: bounded_errors(value) for key, value in items[:MAX_ERROR_FIELDS]}
    if isinstance(errors, list) and len(errors) > MAX_ERROR_FIELDS:
        return [bounded_errors(item) for item in errors[:MAX_ERROR_FIELDS]]
    return errors


def problem_response(status: int, detail: str, *, errors=None, headers=None, type_=None):
    payload = {
        "type": type_ or "about:blank",
        "title": http.HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": (request.script_root + request.path) if request else None,
    }
    if errors is not None:
        payload["errors"] = bounded_errors(errors)
    response = Response(json.dumps(payload), status=status, mimetype=PROBLEM_JSON)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def open_responses(spec: dict) -> dict:
    """Drop ``additionalProperties: false`` from what only responses use.

    marshmallow schemas refuse unknown fields, so apispec writes ``additionalProperties:
    false`` on every schema. For a request body that is the rule (an unknown field is a
    422); for a response it would tell clients that a field added in a later version is
    an error (openapi-generator's Java clients throw on it). So the components reached
    only from responses, and the inline objects in them, leave it unsaid: a response may
    carry fields this version does not document, and generated clients keep or ignore
    them. Components a request uses keep it."""
    components = spec.get("components", {}).get("schemas", {})

    def refs(node, seen: set[str]) -> set[str]:
        """The components ``node`` refers to, and those they refer to, added to ``seen``."""
        for obj in _objects(node):
            name = obj.get("$ref", "").removeprefix("#/components/schemas/")
            if name in components and name not in seen:
                seen.add(name)
                refs(components[name], seen)
        return seen

    requests: set[str] = set()
    answers: list = list(spec.get("components", {}).get("responses", {}).values())
    for item in spec.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            refs(operation.get("requestBody"), requests)
            refs(operation.get("parameters"), requests)
            refs(item.get("parameters"), requests)
            answers.extend((operation.get("responses") or {}).values())

    def relax(node) -> None:
        for obj in _objects(node):
            if obj.get("additionalProperties") is False:
                del obj["additionalProperties"]

    responses = refs(answers, set())
    # The property names of every object in the responses (refs not followed).
    inline = {frozenset(obj["properties"])
              for obj in _objects([answers, [components[name] for name in responses]])
              if isinstance(obj.get("properties"), dict)}
    # A component no operation names, kept for clients to name a shape a response
    # inlines (Progress: inlined where a run may have none), is a response's too.
    named_only = {name for name in set(components) - requests - responses
                  if frozenset(components[name].get("properties") or ()) in inline}
    relax(answers)  # inline schemas of responses; refs are followed below
    for name in (responses - requests) | named_only:
        relax(components[name])
    return spec


def _objects(node):
    """Every dict inside ``node`` (lists and dicts, depth first), ``node`` included."""
    if isinstance(node, dict):
        yield node
        for value in list(node.values()):
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


class Api(BaseApi):
    ERROR_SCHEMA = ProblemSchema

    def _init_spec(self, *args, **kwargs):
        super()._init_spec(*args, **kwargs)
        self.ma_plugin.converter.add_attribute_function(document_no_nul)
        self.ma_plugin.converter.add_attribute_function(document_component)
        self.ma_plugin.converter.add_attribute_function(document_nullable)
        config = self._app.config

        def document_setting_maximum(converter, field, ret=None, **_kwargs) -> dict:
            """A field whose upper bound is a setting (``metadata={"maximum_setting":
            CONFIG_KEY}``) documents this app's value of it."""
            key = field.metadata.get("maximum_setting")
            return {} if key is None else {"maximum": config[key]}

        self.ma_plugin.converter.add_attribute_function(document_setting_maximum)
        # Every way out of the document (/api/openapi.json, `flask openapi write`) goes
        # through to_dict: responses open to fields added later (open_responses).
        to_dict = self.spec.to_dict
        self.spec.to_dict = lambda: open_responses(to_dict())

    def _register_responses(self):
        """Document every error status with the problem+json media type."""
        for status in http.HTTPStatus:
            response = {"description": status.phrase}
            if not (100 <= status < 200) and status not in (204, 304):
                response["schema"] = self.ERROR_SCHEMA
            prepare_response(response, self.spec, PROBLEM_JSON)
            self.spec.components.response(status.name, response, lazy=True)
        response = {"description": "Default error response", "schema": self.ERROR_SCHEMA}
        prepare_response(response, self.spec, PROBLEM_JSON)
        self.spec.components.response("DEFAULT_ERROR", response, lazy=True)

    def _openapi_json(self):
        """The document, with ``servers`` naming the public path prefix of this request."""
        spec = self.spec.to_dict()
        spec["servers"] = [{"url": request.script_root or "/",
                            "description": "This service, as this request reached it"}]
        return Response(json.dumps(spec, indent=2), mimetype="application/json")

    def _register_error_handlers(self):
        self._app.register_error_handler(HTTPException, self.handle_http_exception)

    def handle_http_exception(self, error: HTTPException):
        if error.code == 404 and request and request.url_rule is None:
            return unknown_route()
        headers: dict = {}
        if error.code == 405:
            # Werkzeug puts Allow on the exception; flask-smorest drops it: keep it.
            headers.update(dict(error.get_headers()))
            headers.pop("Content-Type", None)
        data = getattr(error, "data", None) or {}
        headers.update(data.get("headers") or {})
        errors = data.get("errors")
        if errors is None and "messages" in data:
            errors = data["messages"]
        message = data.get("message")
        code = error.code or 500
        if code == 500:
            detail = "Internal error; it has been logged. Try again or report the request id."
            errors = None
        elif message:
            detail = message
        elif isinstance(error, WebsocketMismatch):
            detail = ("This service does not speak WebSocket: send the request as plain "
                      "HTTP, without 'Upgrade: websocket'. A run's events come as a "
                      "server-sent event stream: GET /api/celery/tasks/{task_id}/events.")
        elif errors and code == 400 and _is_invalid_json(errors):
            detail = "The request body is not valid JSON (or not UTF-8): send a JSON object."
            errors = None
        elif errors and _is_not_an_object(errors):
            detail = _not_an_object_detail()
        elif errors:
            detail = validation_detail(errors)
            if isinstance(errors, dict) and "json" in errors and not request.get_data(cache=True):
                detail = f"The request body is empty: send a JSON object. {detail}"
        else:
            detail = error.description or http.HTTPStatus(code).phrase
        return problem_response(code, detail, errors=errors, headers=headers)


ROUTE_ECHO_LIMIT = 200  # characters of an unknown path repeated in the 404's detail


def unknown_route():
    """A request that matched no route: the 404 says so, in words no one takes for an
    unknown task's ("No task with id ..."). A path that only differs from a route by a
    trailing slash is redirected there instead (308: method and body are kept), with a
    relative ``Location`` made from the request's path, never from its Host header."""
    path = request.path
    trimmed = "/" + path.strip("/")
    if path.endswith("/") and trimmed != "/" and "//" not in trimmed:
        adapter = current_app.url_map.bind("localhost", script_name="/")
        try:
            adapter.match(trimmed, method=request.method)
        except HTTPException:  # no such route either (RequestRedirect is one too)
            pass
        else:
            location = quote(request.script_root + trimmed, safe="/:@!$&'()*+,;=-._~%")
            if request.query_string:
                location += "?" + request.query_string.decode("latin-1")
            response = problem_response(
                308, f"This resource has no trailing slash: {request.method} {location}.",
                headers={"Location": location})
            response.autocorrect_location_header = False
            return response
    shown = request.script_root + path
    if len(shown) > ROUTE_ECHO_LIMIT:
        shown = shown[:ROUTE_ECHO_LIMIT] + "..."
    return problem_response(
        404, f"No such route: {request.method} {printable_name(shown)}. The operations are "
             f"listed at {request.script_root}/api/docs (and /api/openapi.json).")


def _is_invalid_json(errors) -> bool:
    return isinstance(errors, dict) and errors.get("json") == ["Invalid JSON body."]


def _is_not_an_object(errors) -> bool:
    """A JSON body that is not an object (``null``, a list, a string, a number):
    marshmallow's schema-level "Invalid input type." (an empty body loads as ``{}``)."""
    return (isinstance(errors, dict) and isinstance(errors.get("json"), dict)
            and errors["json"].get("_schema") == ["Invalid input type."])


JSON_TYPE_NAMES = {type(None): "null", list: "an array", str: "a string", bool: "a boolean",
                   int: "a number", float: "a number"}


def _not_an_object_detail() -> str:
    got = JSON_TYPE_NAMES.get(type(request.get_json(silent=True, cache=True)), "not an object")
    return f"The request body must be a JSON object; it is {got}."


DEEP_JSON = "The JSON body is nested too deeply to be read; flatten it."
LONG_NUMBER = ("A number in the JSON body has more digits than can be read (4,300 at "
               "most); send it as a string.")


class Parser(FlaskParser):
    """webargs' parser, with JSON nested past Python's recursion limit, or holding an
    integer longer than Python converts (``sys.get_int_max_str_digits``), answered as a
    400 (webargs answers only a syntax error so; these would be a 500)."""

    def load_querystring(self, req, schema):
        """The query string; a parameter that takes one value given more than once
        (``limit=1&limit=2``) is a 422 naming it, not its first value taken silently."""
        proxy = super().load_querystring(req, schema)
        repeated = [key for key in req.args if key not in proxy.multiple_keys
                    and len(req.args.getlist(key)) > 1]
        if repeated:
            abort(422, errors={"query": {
                printable_name(key)[:100]: ["Given more than once: send it once."]
                for key in repeated[:MAX_DETAIL_LINES]}})
        return proxy

    def _raw_load_json(self, req):
        try:
            return super()._raw_load_json(req)
        except RecursionError:
            abort(400, message=DEEP_JSON)
        except JSONDecodeError:
            raise  # webargs answers it: "Invalid JSON body."
        except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
            abort(400, message=LONG_NUMBER)


class Blueprint(BaseBlueprint):
    """flask-smorest's Blueprint; errors are documented with ``ProblemSchema``."""

    ARGUMENTS_PARSER = Parser()


def error_responses(blp: BaseBlueprint, *codes: int):
    """Decorator documenting each error status of an operation (problem+json components)."""

    def decorator(func):
        for code in reversed(codes):
            func = blp.alt_response(code, response=http.HTTPStatus(code).name)(func)
        return func

    return decorator
