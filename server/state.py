"""What the HTTP handlers share: settings, the text side, metrics and (once started) the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from scheduler.api import Engine
from scheduler.errors import NoAgentsAvailable
from scheduler.types import EngineSnapshot
from server.errors import ModelNotFound
from server.metrics import ServerMetrics
from server.text import TextModel


@dataclass(frozen=True)
class ServerSettings:
    """What the HTTP front door is told at start."""

    model_dir: Path  # Hugging Face checkpoint folder: tokenizer, chat template, config
    served_model_name: str  # the model id clients send and /v1/models lists
    api_key: str | None = None  # when set, /v1/* requires "Authorization: Bearer <api_key>"
    max_body_bytes: int = 4 * 2**20  # request bodies beyond this get 413 before they are read; 0 = no bound


class ServerState:
    """What the handlers share: settings, the text side, metrics and (once started) the engine."""

    def __init__(self, settings: ServerSettings, text: TextModel) -> None:
        self.settings = settings
        self.text = text
        self.created = int(time.time())  # Unix seconds; the model card's "created"
        self._engine: Engine | None = None
        self.metrics = ServerMetrics(self.snapshot, settings.served_model_name)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise NoAgentsAvailable("the engine has not started yet")
        return self._engine

    def attach(self, engine: Engine | None) -> None:
        self._engine = engine

    def snapshot(self) -> EngineSnapshot | None:
        return self._engine.snapshot() if self._engine is not None else None

    def check_model(self, model: str | None) -> str:
        """The served model name; ModelNotFound when `model` names another one."""
        if model is not None and model != self.settings.served_model_name:
            raise ModelNotFound(model)
        return self.settings.served_model_name
