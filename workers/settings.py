"""Worker-side settings, read from the environment (docs/configuration.md has the full table)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from producer.settings import ProducerSettings


class WorkerConfig(ProducerSettings):
    model_config = SettingsConfigDict(env_prefix="MEMFLEET_", extra="ignore")

    data_dir: Path = Field(default=Path("~/.memfleet").expanduser(), description="embedded PostgreSQL (no pg_url)")
    pg_url: str | None = Field(default=None, description="external PostgreSQL with pgvector")
    pg_pool_size: int = Field(default=16, ge=1, description="PostgreSQL connections per worker process")
    mem0_api_key: str | None = Field(default=None, validation_alias=AliasChoices("MEM0_API_KEY"))
    mem0_host: str = Field(default="https://api.mem0.ai", description="hosted mem0 API base URL")
    mem0_timeout: float = Field(default=30.0, gt=0, description="seconds per hosted API request")
    openai_api_key: str | None = Field(default=None, validation_alias=AliasChoices("OPENAI_API_KEY"))
    llm_base_url: str | None = Field(default=None, description="OpenAI-compatible server for fact extraction")
    llm_model: str = "gpt-4.1-nano"
    llm_timeout: float = Field(default=60.0, gt=0, description="seconds one fact-extraction call may take")
    telemetry: bool = Field(default=False, description="mem0's anonymous telemetry; off unless set")
    # 64: with five-message adds a job is bound by its own round trips, not by the encoder, and more
    # of them in flight fill the encoder's batches (20,000 messages of 4,000 users: 358/s at 16,
    # 472 at 64, 474 at 128; searches during an ingest kept p99 34 ms: docs/benchmarks.md).
    concurrency: int = Field(default=64, ge=1, description="bulk jobs at a time per process")
    search_concurrency: int = Field(default=16, ge=1, description="search/list jobs at a time per process")
    # A user's search index in memory (workers.backends.search_cache): 4.4 ms instead of 69 for a
    # user with 20,000 memories, 15 instead of 450 with 100,000 (the table's part); from 200,
    # LoCoMo's users (~600) are held too: idle search p50 12.3 ms instead of 14.5, 161 searches/s
    # instead of 139 (docs/benchmarks.md, Intel Xeon with AMX, 2026-12-07).
    search_index_min_memories: int = Field(
        default=200, ge=0, description="memories a user needs for a worker to keep their search index in memory")
    search_index_mb: int = Field(
        default=512, ge=0, description="memory for in-memory search indexes per worker process, in MiB; 0: none")
    search_index_idle: float = Field(
        default=600.0, gt=0, description="seconds an in-memory search index is kept without a search of its user")
    embed_batch: int = Field(default=32, ge=1, description="bulk texts per encoder call (length-sorted)")
    embed_window: int = Field(default=1024, ge=1, description="bulk texts sorted together before encoding")
    embed_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="model weights' precision; auto: bf16 where the CPU has it natively"
    )
    embed_runtime: Literal["auto", "torch", "onnx"] = Field(
        default="auto", description="auto: PyTorch where bf16 is native, else ONNX Runtime (fp32)"
    )
    embed_threads: int | None = Field(default=None, ge=1,
                                      description="bulk encoding streams, one core each; default: all usable cores")
    max_tries: int = Field(default=8, ge=1, description="attempts before a job goes to the dead-letter list")
    pg_idle_transaction_timeout: float = Field(
        default=30.0, gt=0, description="seconds PostgreSQL lets a worker's session idle inside a transaction")
    expiry_sweep_interval: float = Field(default=10.0, gt=0, le=3600,
                                         description="seconds between sweeps that delete expired memories")
    stranded_check_interval: float = Field(
        default=30.0, gt=0, le=3600,
        description="seconds between looks for writes whose job ended without applying them (workers.stranded)")
    job_timeout: float = Field(default=300.0, gt=0)
    # Set by `memfleet worker` (producer.services.start_workers) for the workers it starts.
    supervisor_pid: int | None = Field(default=None, description="stop when this parent process is gone")

    @model_validator(mode="after")
    def _onnx_is_fp32(self) -> WorkerConfig:
        if self.embed_runtime == "onnx" and self.embed_precision == "bf16":
            raise ValueError("MEMFLEET_EMBED_RUNTIME=onnx computes in fp32: set MEMFLEET_EMBED_PRECISION "
                             "to fp32 or auto, or the runtime to torch for bf16")
        return self

    @model_validator(mode="after")
    def _llm_within_job(self) -> WorkerConfig:
        # A write is given half the job timeout (workers.write_log); an LLM call that outlived it
        # would be cut as a failed write rather than retried as the LLM outage it is.
        if self.llm_configured and self.llm_timeout >= self.job_timeout / 2:
            raise ValueError(f"MEMFLEET_LLM_TIMEOUT ({self.llm_timeout:g} s) must be under half of "
                             f"MEMFLEET_JOB_TIMEOUT ({self.job_timeout:g} s): lower it, or raise the job timeout")
        return self

    @property
    def llm_configured(self) -> bool:
        return bool(self.openai_api_key or self.llm_base_url)
