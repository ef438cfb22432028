"""Configuration shared by the API and the workers, read from the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .api_keys import ApiKey, parse_api_keys

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# The folder of worker state under the data root when FASTIF_STATE_DIR is unset.
DEFAULT_STATE_DIR_NAME = ".fastif"


class Settings(BaseSettings):
    """Every knob of the service; env `FASTIF_<NAME>` except `REDIS_URL`."""

    # hide_input_in_errors: a bad setting's error must not print FASTIF_API_KEYS' secrets.
    model_config = SettingsConfigDict(env_prefix="FASTIF_", populate_by_name=True, extra="ignore",
                                      hide_input_in_errors=True)

    # Unset means "not configured": `fastif standalone` then starts an embedded Redis.
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    data_root: Path = Path("./data")
    # NoDecode: the env value is a comma-separated list, not JSON. Entries are `name:key:role` or a
    # bare key (an admin); read `credentials` for the parsed keys.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    _credentials: tuple[ApiKey, ...] = PrivateAttr(default=())
    max_inputs: int = Field(default=64, ge=1)
    # A dataset job's input file (inputs_from) may hold this many rows.
    max_dataset_inputs: int = Field(default=100_000, ge=1)
    # A dataset job's shards in the queue or running at once: other jobs queue between them (workers/dataset.py).
    dataset_shards_in_flight: int = Field(default=8, ge=1)
    max_text_chars: int = Field(default=4000, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    result_ttl_s: int = Field(default=7 * 86400, ge=1)
    cache_ttl_s: int = Field(default=86400, ge=1)
    # All cached gradients and s_tests together (workers/tensor_cache.py): the least recently used go past it.
    cache_max_bytes: int = Field(default=2 * 2**30, ge=0)
    max_deliveries: int = Field(default=3, ge=1)
    max_queued_jobs: int = Field(default=1000, ge=1)
    # Where workers keep indices, features and pictures, as configured; read `state_root`, which
    # applies the default (<data_root>/.fastif) even on a copy made without validation.
    state_dir: Path | None = None
    # Longer than the longest job, or the broker redelivers a message that is still running.
    visibility_timeout_s: int = Field(default=6 * 3600, ge=1)
    # Workers beat this often; a heartbeat lives 3 beats, and the tasks of a worker whose heartbeat
    # stayed away for 2.5 more are sent again (records/inflight.py).
    heartbeat_interval_s: float = Field(default=10.0, gt=0, le=600)
    # Workers compile each model's H·v with torch.compile (fastif/compiled.py): 10-30 s once per
    # worker process and model, then LiSSA steps about 1.4-1.5x faster. Needs a C++ compiler.
    compile_hvp: bool = Field(default=False, validation_alias="FASTIF_COMPILE")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        """Accept `a,b,c` from the environment; blanks are dropped, so empty means no auth."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _parse_credentials(self) -> Settings:
        """Parse the key entries once, so a malformed entry stops the service from starting."""
        self._credentials = parse_api_keys(self.api_keys)
        return self

    @property
    def credentials(self) -> tuple[ApiKey, ...]:
        """The configured API keys with their names and roles; empty means no authentication."""
        return self._credentials

    @model_validator(mode="after")
    def _default_state_dir(self) -> Settings:
        """Put worker state under the data root unless told otherwise (the field then reads as `state_root`)."""
        self.state_dir = self.state_root
        return self

    @property
    def state_root(self) -> Path:
        """The folder of worker state: FASTIF_STATE_DIR, else `<data_root>/.fastif`."""
        return self.state_dir if self.state_dir is not None else self.data_root / DEFAULT_STATE_DIR_NAME

    @property
    def effective_redis_url(self) -> str:
        """The Redis to talk to: REDIS_URL, or a local default when it is unset."""
        return self.redis_url or DEFAULT_REDIS_URL


class _InitOnlySettings(Settings):
    """Settings that ignore the environment, so tests do not depend on the caller's shell."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, *args: Any, **kwargs: Any):  # type: ignore[override]
        """Read only the keyword arguments."""
        return (init_settings,)


def settings_from(**overrides: Any) -> Settings:
    """Build Settings from keyword overrides and defaults only (no environment); for tests."""
    return _InitOnlySettings(**overrides)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide Settings read from the environment (cached)."""
    return Settings()
