"""Service settings: embedded defaults, a TOML file, then ``EXFILWATCH_*`` environment variables.

Every field has a default, so ``exfilwatch serve`` runs with no file at all. Later layers win:
defaults < TOML file < environment. Nested fields use ``__`` in environment names, e.g.
``EXFILWATCH_API__TOKEN`` or ``EXFILWATCH_STORE__URL``. Unknown keys are errors, so a typo in a
config file is reported instead of silently ignored; :func:`check` names every error at once.

Example (every key optional)::

    [api]
    host = "127.0.0.1"
    port = 8080
    token_file = "/run/secrets/exfilwatch-token"   # writes need "Authorization: Bearer <token>"
    read_token_file = "/run/secrets/exfilwatch-read-token"  # incident reads: this or the above

    [store]
    url = "postgresql+psycopg://exfilwatch@127.0.0.1:5432/exfilwatch"

    [[sources]]
    name = "spool"
    kind = "directory"
    path = "spool"

    [[sinks]]
    name = "soc"
    kind = "webhook"
    url = "https://soc.example.com/hooks/exfilwatch"
    secret = "whsec_..."
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from detector.errors import ConfigError

ENV_PREFIX = "EXFILWATCH_"
ALERT_KINDS = ("incident.opened", "incident.escalated", "incident.resolved")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiSettings(_Strict):
    host: str = Field("127.0.0.1", description="Address to listen on (loopback by default).")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0 picks a free one).")
    token: str | None = Field(
        None,
        description="Bearer token every write needs (ingest, verdicts, promote); the service "
        "refuses to listen beyond loopback without one.",
    )
    token_file: Path | None = Field(
        None, description="File holding the token (e.g. a mounted secret); wins over token."
    )
    read_token: str | None = Field(
        None,
        description="Bearer token that reads of incidents and the model need (the write token "
        "reads too); without one those reads are open.",
    )
    read_token_file: Path | None = Field(
        None,
        description="File holding the read token (e.g. a mounted secret); wins over read_token.",
    )
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest POST /v1/events body accepted."
    )
    max_verdict_body_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest body of the other writes (ack, false positive, resolve, promote).",
    )
    max_decoded_rows: int = Field(
        500_000, ge=1, description="Most events one Parquet or Arrow body may decode to."
    )
    max_decoded_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="Most bytes one Parquet or Arrow body may decode to (its columns in memory).",
    )
    external_url: str | None = Field(
        None, description="Base URL at which people reach this API; used in alert links."
    )


class StoreSettings(_Strict):
    url: str | None = Field(
        None,
        description="SQLAlchemy URL of the state store; default SQLite at "
        "<state_dir>/exfilwatch.db. PostgreSQL: postgresql+psycopg://user@host:5432/db.",
    )


class _SourceBase(_Strict):
    name: str = Field(
        pattern=r"^[a-z][a-z0-9_-]{0,31}$",
        description="Source name, used in metrics labels (http and stdin are reserved).",
    )
    format: str = Field(
        "canonical",
        description="canonical (Parquet or JSON lines; a stream: JSON lines) or an audit-log "
        "adapter name.",
    )
    default_tz: str | None = Field(None, description="Zone for naive timestamps (else rejected).")
    options: dict[str, str] = Field(
        default_factory=dict, description="Adapter options, e.g. log_line_prefix."
    )


class DirectorySource(_SourceBase):
    """Files dropped into (or written in) a directory: Parquet and compressed JSON lines are
    read once; plain JSON lines and audit logs are tailed, following rotation."""

    kind: Literal["directory"] = Field("directory", description="The source type.")
    path: Path = Field(description="Directory to watch (created when missing).")
    pattern: str = Field("*", description="Glob for the files to read, relative to path.")


class JetStreamSource(_SourceBase):
    """A NATS JetStream stream, read in sequence order; each message holds whole records
    (canonical JSON lines or lines of an audit-log format). The stream is not changed: no
    acknowledgements, no durable consumer; the position commits with the batches."""

    kind: Literal["nats"] = Field("nats", description="The source type.")
    url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated.")
    stream: str = Field(pattern=r"^[^.*>\s]+$", description="JetStream stream to read.")
    subject: str | None = Field(None, description="Only messages on this subject (wildcards ok).")
    start: Literal["all", "new"] = Field(
        "all",
        description="With no saved position: from the stream's first message, or only new ones.",
    )
    credentials_file: Path | None = Field(None, description="NATS credentials (.creds) file.")
    fetch_messages: int = Field(
        1000, ge=1, le=100_000, description="Messages per fetch at most (fewer past 8 MiB)."
    )


SourceSettings = Annotated[DirectorySource | JetStreamSource, Field(discriminator="kind")]


def _default_sources() -> list[SourceSettings]:
    return [DirectorySource(name="spool", path=Path("spool"))]


class _SinkBase(_Strict):
    name: str = Field(
        pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="Sink name, used in metrics labels."
    )
    kinds: tuple[str, ...] = Field(ALERT_KINDS, description="Alert kinds sent to this sink.")
    min_severity: Literal["low", "medium", "high", "critical"] = Field(
        "low", description="Alerts of lower severity are not sent to this sink."
    )
    timeout_s: float = Field(10.0, gt=0, description="Per-request timeout, seconds.")

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [k for k in value if k not in ALERT_KINDS]
        if unknown:
            raise ValueError(f"unknown alert kind {unknown}; valid: {', '.join(ALERT_KINDS)}")
        return value


class WebhookSink(_SinkBase):
    kind: Literal["webhook"] = Field("webhook", description="Signed JSON webhook.")
    url: str = Field(description="Where alerts are POSTed.")
    secret: str | None = Field(
        None,
        description="Standard Webhooks secret (whsec_...); several separated by spaces, for "
        "rotation. Prefer secret_file (a mounted secret) over putting it in the file.",
    )
    secret_file: Path | None = Field(
        None, description="File holding the secret(s); wins over secret."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra request headers, e.g. Authorization."
    )

    @model_validator(mode="after")
    def _has_secret(self) -> WebhookSink:
        if not self.secret and self.secret_file is None:
            raise ValueError("a webhook sink needs secret or secret_file")
        return self

    def secrets(self) -> list[str]:
        """The signing secret(s), read from secret_file when one is named."""
        text = _read_secret(self.secret_file) if self.secret_file else self.secret or ""
        return text.split()


class SlackSink(_SinkBase):
    kind: Literal["slack"] = Field("slack", description="Slack incoming webhook.")
    url: str = Field(description="The incoming-webhook URL (treat it as a secret).")


class AlertmanagerSink(_SinkBase):
    kind: Literal["alertmanager"] = Field(
        "alertmanager", description="Alertmanager v2 API, kept in sync with open incidents."
    )
    url: str = Field(description="Alertmanager base URL, e.g. http://127.0.0.1:9093.")
    interval_s: float = Field(30.0, gt=0, description="How often open incidents are re-sent.")


SinkSettings = Annotated[WebhookSink | SlackSink | AlertmanagerSink, Field(discriminator="kind")]


class PipelineSettings(_Strict):
    batch_events: int = Field(10_000, ge=1, description="Flush a micro-batch at this many events.")
    batch_delay_s: float = Field(
        0.25, gt=0, description="...or when its oldest event has waited this long."
    )
    queue_events: int = Field(
        50_000, ge=1, description="Events held between sources and scoring (backpressure)."
    )
    read_events: int = Field(10_000, ge=1, description="Events per read from a file.")
    poll_s: float = Field(0.1, gt=0, description="How often directories are scanned.")
    snapshot_every_s: float = Field(
        30.0, gt=0, description="Feature-state snapshot interval (bounds restart replay)."
    )


class IncidentSettings(_Strict):
    resolve_after_s: float = Field(
        3600.0, gt=0, description="An incident quiet this long (event time or wall time) resolves."
    )
    suppress_false_positive_s: float = Field(
        7 * 86400.0, ge=0, description="A false-positive verdict silences its pattern this long."
    )


class FeatureStateSettings(_Strict):
    """Bounds of the per-principal feature state (detector.features.settings.StateBounds)."""

    max_unproven: int = Field(
        10_000,
        ge=0,
        description="User names never seen to log in (failed logins only) that keep state of "
        "their own, about 3 KB each; failed logins of further new names share one state row "
        "(still counted per address and together).",
    )
    unproven_idle_s: float = Field(
        86_400.0,
        gt=0,
        description="A name that never logged in and has been quiet this long is forgotten.",
    )
    idle_days: int = Field(
        180,
        ge=1,
        description="A principal unseen for this many days of the stream (days with events) "
        "is forgotten: it is judged as a new principal if it returns.",
    )


class RetentionSettings(_Strict):
    """How long the store keeps what is done with. Undelivered alerts and incidents that are
    open or acknowledged are never pruned."""

    delivered_alerts_days: float = Field(
        30.0,
        ge=0,
        description="Delivered outbox rows are deleted this long after delivery (0: kept for "
        "ever).",
    )
    closed_incidents_days: float = Field(
        365.0,
        ge=0,
        description="Resolved and false-positive incidents are deleted this long after their "
        "last change, once no alert of theirs waits for delivery (0: kept for ever). Verdicts "
        "(feedback) are kept.",
    )
    every_s: float = Field(3600.0, gt=0, description="How often pruning runs.")


class Settings(BaseSettings):
    """The whole service configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    state_dir: Path = Field(Path("var"), description="Where the service keeps its state.")
    models_dir: Path = Field(Path("models"), description="Model root.")
    model: str = Field("default", description="Model name; the version its `current` names.")
    model_signing_key: str | None = Field(
        None,
        description="HMAC-SHA256 key every model version must be signed with (its "
        "SHA256SUMS.sig); unsigned or wrongly signed versions are refused. Several separated by "
        "spaces during a rotation (the first signs). Prefer model_signing_key_file.",
    )
    model_signing_key_file: Path | None = Field(
        None, description="File holding the model-signing key(s); wins over model_signing_key."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level logged (JSON lines on stderr)."
    )
    api: ApiSettings = ApiSettings()
    store: StoreSettings = StoreSettings()
    sources: list[SourceSettings] = Field(
        default_factory=_default_sources,
        description="Where events come from: directories and JetStream streams.",
    )
    sinks: list[SinkSettings] = Field(default_factory=list)
    pipeline: PipelineSettings = PipelineSettings()
    incidents: IncidentSettings = IncidentSettings()
    features: FeatureStateSettings = FeatureStateSettings()
    retention: RetentionSettings = RetentionSettings()

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        for what, names in (
            ("source", [s.name for s in self.sources]),
            ("sink", [s.name for s in self.sinks]),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what} names must be unique; repeated: {', '.join(dup)}")
        reserved = sorted({s.name for s in self.sources} & {"http", "stdin"})
        if reserved:
            raise ValueError(f"source names http and stdin are the service's own: {reserved}")
        return self

    def api_token(self) -> str | None:
        """The write token, read from api.token_file when one is named; ConfigError when one
        is set but empty."""
        return _token(self.api.token, self.api.token_file, "api.token")

    def api_read_token(self) -> str | None:
        """The read token, read from api.read_token_file when one is named; ConfigError when
        one is set but empty."""
        return _token(self.api.read_token, self.api.read_token_file, "api.read_token")

    @field_validator("model_signing_key")
    @classmethod
    def _usable_signing_key(cls, value: str | None) -> str | None:
        try:
            model_signing_keys(value, None)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("model_signing_key: ")) from None
        return value

    def model_signing_keys(self) -> tuple[bytes, ...]:
        """The model-signing keys (none: versions need no signature); ConfigError when one
        is configured but empty or too short."""
        return model_signing_keys(self.model_signing_key, self.model_signing_key_file)

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.state_dir / 'exfilwatch.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # environment over file values (passed as init kwargs) over defaults
        return (env_settings, init_settings)


def _token(inline: str | None, path: Path | None, key: str) -> str | None:
    """A bearer token from its file (wins) or inline value; None when neither is set. An empty
    one is an error, never a quiet way to open the API (a secret mounted empty, a variable set
    to nothing)."""
    if path is None and inline is None:
        return None
    text = (_read_secret(path) if path is not None else inline or "").strip()
    if not text:
        where = f"{key}_file {path}" if path is not None else key
        raise ConfigError(f"{where} is empty: give the token a value, or unset it")
    return text


#: A model-signing key has at least this many characters (``openssl rand -hex 32`` gives 64).
MIN_SIGNING_KEY_CHARS = 32


def model_signing_keys(inline: str | None, path: Path | None) -> tuple[bytes, ...]:
    """Keys from a file (wins) or an inline value, separated by whitespace; none when neither
    is set. A key that is set must be usable: an empty file or value is an error, not a quiet
    way to turn signing off."""
    if path is None and inline is None:
        return ()
    where = str(path) if path is not None else "model_signing_key"
    keys = (_read_secret(path) if path is not None else inline or "").split()
    if not keys:
        raise ConfigError(f"{where}: holds no model-signing key (unset it to turn signing off)")
    if any(len(k) < MIN_SIGNING_KEY_CHARS for k in keys):
        raise ConfigError(
            f"{where}: a model-signing key needs at least {MIN_SIGNING_KEY_CHARS} characters "
            "(e.g. openssl rand -hex 32)"
        )
    return tuple(k.encode("utf-8") for k in keys)


def _read_secret(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror or exc}") from exc


def load(path: Path | None = None) -> Settings:
    """Settings from the TOML file at ``path`` (if any) and the environment. ConfigError lists
    every problem, each with the key it concerns."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, path)) from None


def describe(exc: ValidationError, path: Path | None) -> str:
    """One line per problem: ``<where>: <key.path>: <message>``."""
    where = str(path) if path is not None else "configuration"
    lines = [f"{exc.error_count()} error(s) in {where}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)
