"""The endpoint registry: an endpoint is DECLARED once, and its routes are generated from it.

    REGISTRY.declare(EndpointSpec(
        endpoint_id="fal-ai/flux-2/klein/9b/base",
        input_model=FluxKleinInput,
        output_model=FluxKleinOutput,
        title="FLUX.2 [klein] 9B base",
    ))

For each declared endpoint the app serves (see api/app.py):
    POST /<id>                  sync run        POST /<id>/stream     SSE progress + the output
    POST /queue/<id>            queue submit    (also on hosts named queue.*)
and, once per owner/alias (fal drops the path part for these):
    GET  /queue/<owner>/<alias>/requests/<id>/status[/stream]
    GET  /queue/<owner>/<alias>/requests/<id>
    PUT  /queue/<owner>/<alias>/requests/<id>/cancel

Each klein family (schema.FAMILIES) declares its four endpoints (`family_specs`: text to image,
/edit, /lora, /edit/lora), run by the engine named after the family; `default_registry(families)`
serves some and lists the others as unserved, with how to enable them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from pydantic import BaseModel

from kleinserve.schema import (
    DEFAULT_FAMILY,
    FAMILIES,
    FluxKleinInput,
    FluxKleinOutput,
    family_of,
)

if TYPE_CHECKING:
    from kleinserve.engine.types import GenerationResult
    from kleinserve.service.jobs import Job

NAMESPACES = ("workflows", "comfy")

# build_output(job, request, result, files) -> output JSON dict
#   job: service.jobs.Job; request: the validated input model; result: engine GenerationResult;
#   files: one {"url", "file_name", "file_size"} per result image (a stored file's URL, or a data
#   URI in sync mode)
OutputBuilder = Callable[[Any, FluxKleinInput, Any, list[dict[str, Any]]], dict[str, Any]]


def split_endpoint_id(endpoint_id: str) -> tuple[Optional[str], str, str, Optional[str]]:
    """(namespace, owner, alias, path) the way the fal clients split an id."""
    parts = endpoint_id.strip("/").split("/")
    namespace = None
    if parts[0] in NAMESPACES:
        namespace, parts = parts[0], parts[1:]
    if len(parts) < 2:
        raise ValueError(f"endpoint id {endpoint_id!r} must look like owner/alias[/path]")
    path = "/".join(parts[2:]) or None
    return namespace, parts[0], parts[1], path


def app_prefix(endpoint_id: str) -> str:
    """`[namespace/]owner/alias` of an endpoint id: what the queue's per-request URLs are built on
    (fal drops the path part for them)."""
    namespace, owner, alias, _ = split_endpoint_id(endpoint_id)
    return f"{namespace}/{owner}/{alias}" if namespace else f"{owner}/{alias}"


def flux_klein_output(job: Job, request: FluxKleinInput, result: GenerationResult,
                      files: list[dict[str, Any]]) -> dict[str, Any]:
    out = FluxKleinOutput.from_result(request, result, [(f["url"], f["file_name"]) for f in files])
    return out.model_dump(mode="json")


@dataclass(frozen=True)
class EndpointSpec:
    endpoint_id: str
    input_model: type[FluxKleinInput]  # the engine reads its fields
    output_model: type[BaseModel]
    title: str = ""
    description: str = ""
    engine: str = "default"  # which loaded engine runs it
    build_output: OutputBuilder = flux_klein_output
    seed_field: Optional[str] = "seed"  # drawn at submit time when absent (so a re-run reproduces)
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def app_prefix(self) -> str:
        return app_prefix(self.endpoint_id)

    def route_name(self, kind: str) -> str:
        """The Python name of this endpoint's `kind` route handler (submit, run, stream)."""
        return f"{kind}_{self.endpoint_id.replace('/', '_').replace('-', '_').replace('.', '_')}"

    def validate_input(self, data: Any) -> FluxKleinInput:
        return self.input_model.model_validate(data)


class EndpointRegistry:
    def __init__(self, specs: Iterable[EndpointSpec] = ()):
        self._specs: dict[str, EndpointSpec] = {}
        # Endpoints of klein families with no checkpoint on this server: id -> how to enable it.
        self.unserved: dict[str, str] = {}
        for s in specs:
            self.declare(s)

    def declare(self, spec: EndpointSpec) -> EndpointSpec:
        split_endpoint_id(spec.endpoint_id)  # validates the shape
        if spec.endpoint_id in self._specs:
            raise ValueError(f"endpoint {spec.endpoint_id} is already declared")
        self._specs[spec.endpoint_id] = spec
        return spec

    def get(self, endpoint_id: str) -> EndpointSpec:
        try:
            return self._specs[endpoint_id]
        except KeyError:
            raise KeyError(f"unknown endpoint {endpoint_id!r}") from None

    def __contains__(self, endpoint_id: str) -> bool:
        return endpoint_id in self._specs

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def ids(self) -> list[str]:
        return list(self._specs)

    def subset(self, engine: str) -> EndpointRegistry:
        """The endpoints run by one engine (a klein family): what that family's worker claims."""
        sub = EndpointRegistry([s for s in self._specs.values() if s.engine == engine])
        sub.unserved = dict(self.unserved)
        return sub

    def engines(self) -> list[str]:
        """The engine (family) names the declared endpoints need, in declaration order."""
        return list(dict.fromkeys(s.engine for s in self._specs.values()))

    def app_prefixes(self) -> list[str]:
        """Distinct `[namespace/]owner/alias` prefixes (the queue request routes are per prefix)."""
        seen: dict[str, None] = {}
        for s in self._specs.values():
            seen.setdefault(s.app_prefix, None)
        return list(seen)

    def first_segments(self) -> set[str]:
        """First path segments that belong to endpoints (owners and namespaces)."""
        return {s.endpoint_id.split("/")[0] for s in self._specs.values()}


_DESCRIPTIONS = {
    "": "Text to image.",
    "/edit": "Edits or composes 1..4 reference images (image_urls) by the prompt; without image_size the "
             "output takes the first image's size.",
    "/lora": "Text to image with up to 3 LoRA adapters (loras: [{path, scale}]).",
    "/edit/lora": "Edits 1..4 reference images with up to 3 LoRA adapters.",
}
_SUFFIX_TITLES = {"": "text to image", "/edit": "edit with reference images", "/lora": "text to image with LoRA",
                  "/edit/lora": "edit with LoRA"}


def family_specs(family_name: str) -> list[EndpointSpec]:
    """The four endpoints of a klein family, run by the engine named after the family."""
    family = FAMILIES[family_name]
    specs = []
    for eid in family.endpoint_ids():
        suffix = eid[len(family.base_id):]
        specs.append(EndpointSpec(
            endpoint_id=eid, input_model=family.input_model(eid), output_model=FluxKleinOutput,
            title=f"{family.title} — {_SUFFIX_TITLES[suffix]}",
            description=f"{_DESCRIPTIONS[suffix]} Licence: {family.licence}.", engine=family.name,
            tags=tuple(t for t in ("edit", "lora") if t in suffix)))
    return specs


def how_to_enable(endpoint_id: str) -> str:
    """What a server must be started with to serve `endpoint_id` (for the 503 of an unserved endpoint)."""
    family = family_of(endpoint_id)
    return (f"{endpoint_id} is not served here: no {family.title} checkpoint is loaded. Start the server "
            f"with --model {family.name}=<folder or Hugging Face repo id> (e.g. {family.name}={family.default_repo};"
            f" {family.licence}) beside the others, comma-separated: --model 9b-base=...,{family.name}=...")


def default_registry(families: Iterable[str] = (DEFAULT_FAMILY,)) -> EndpointRegistry:
    """A fresh registry with the endpoints of the served `families` (each app gets its own copy); the
    other families' endpoints are listed in `unserved` with how to enable them."""
    served = list(dict.fromkeys(families))
    for name in served:
        if name not in FAMILIES:
            raise ValueError(f"unknown klein family {name!r}; expected one of {', '.join(FAMILIES)}")
    registry = EndpointRegistry([spec for name in served for spec in family_specs(name)])
    for name, family in FAMILIES.items():
        if name not in served:
            for eid in family.endpoint_ids():
                registry.unserved[eid] = how_to_enable(eid)
    return registry
