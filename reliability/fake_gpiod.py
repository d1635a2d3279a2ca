"""A stand-in for the `gpiod` package (libgpiod's v2 Python bindings) on a machine with no GPIO
chip: the part of its API that edge.relay uses, with the real names and signatures
(tests/unit/test_relay.py compares them with the real package when it is installed), over a
simulated board whose lines record every level they take.

    with installed(Board({"/dev/gpiochip0": ["", "PQ.06", ...]})) as board:
        ...  # `import gpiod` now gives this module's API
        board.line("/dev/gpiochip0", 1).history  # [(time.monotonic(), physical level), ...]

Levels are physical (True = high), as a gpiozero MockPin's are: a request's active_low inverts
its values on the wire. What the fake does not model it refuses (NotImplementedError), so code
written against it cannot lean on behaviour nobody checked."""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType

from edge.config import RelayConfig


class Value(Enum):
    INACTIVE = 0
    ACTIVE = 1

    def __bool__(self) -> bool:
        return self == self.ACTIVE


class Direction(Enum):
    AS_IS = 1
    INPUT = 2
    OUTPUT = 3


@dataclass(repr=False)
class LineSettings:
    """The fields edge.relay sets, with the real defaults; the real class has more (edge
    detection, bias, drive, debounce, event clock), all left at their defaults by the relay."""

    direction: Direction = Direction.AS_IS
    active_low: bool = False
    output_value: Value = Value.INACTIVE


@dataclass
class ChipInfo:
    name: str
    label: str
    num_lines: int


class ChipClosedError(Exception):
    def __init__(self) -> None:
        super().__init__("I/O operation on closed chip")


class RequestReleasedError(Exception):
    def __init__(self) -> None:
        super().__init__("GPIO lines have been released")


# ------------------------------------------------------------------ the simulated board
@dataclass
class FakeLine:
    name: str
    history: list[tuple[float, bool]] = field(default_factory=lambda: [(time.monotonic(), False)])
    holder: LineRequest | None = None

    @property
    def state(self) -> bool:
        return self.history[-1][1]

    def drive(self, level: bool) -> None:
        if level != self.state:  # a write of the level the line has changes nothing on the wire
            self.history.append((time.monotonic(), level))


class Board:
    """GPIO chips by device path, each a list of line names ("" = unnamed); every line starts low.
    `requests` keeps each line request made, released or not, in order."""

    def __init__(self, chips: dict[str, list[str]]):
        self.chips = {path: [FakeLine(name) for name in names] for path, names in chips.items()}
        self.requests: list[LineRequest] = []

    def line(self, path: str, offset: int) -> FakeLine:
        return self.chips[path][offset]


_board: Board | None = None




# ------------------------------------------------------------------ the gpiod API
def is_gpiochip_device(path: str) -> bool:
    return _board is not None and path in _board.chips


class Chip:
    def __init__(self, path: str):
        if not is_gpiochip_device(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        self._board = _board
        self._lines: list[FakeLine] | None = _board.chips[path]
        self._path = path

    def __enter__(self) -> Chip:
        self._check_closed()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc_value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _check_closed(self) -> None:
        if self._lines is None:
            raise ChipClosedError()

    def close(self) -> None:
        self._lines = None

    def get_info(self) -> ChipInfo:
        self._check_closed()
        return ChipInfo(os.path.basename(self._path), "fake", len(self._lines))

    def line_offset_from_id(self, id: str | int) -> int:
        self._check_closed()
        if not isinstance(id, int):
            names = [line.name for line in self._lines]
            if id in names:
                return names.index(id)
            try:
                offset = int(id)
            except ValueError:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT)) from None
        else:
            offset = id
        if offset >= len(self._lines):
            raise ValueError("line offset of out range")
        return offset

    def request_lines(self, config: dict[Iterable[int | str] | int | str, LineSettings | None],
                      consumer: str | None = None, event_buffer_size: int | None = None,
                      output_values: dict[int | str, Value] | None = None) -> LineRequest:
        self._check_closed()
        if output_values is not None or any(not isinstance(k, (int, str)) for k in config):
            raise NotImplementedError("the fake requests single lines with their own settings only")
        settings = {self.line_offset_from_id(k): v or LineSettings() for k, v in config.items()}
        for offset in settings:
            if self._lines[offset].holder is not None:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        request = LineRequest(self._board, self._path, settings, consumer)
        for offset, s in settings.items():
            self._lines[offset].holder = request
            if s.direction == Direction.OUTPUT:  # direction and value are set together, in the request
                self._lines[offset].drive(bool(s.output_value) != s.active_low)
        self._board.requests.append(request)
        return request


def request_lines(path: str, config: dict[Iterable[int | str] | int | str, LineSettings | None],
                  consumer: str | None = None, event_buffer_size: int | None = None,
                  output_values: dict[int | str, Value] | None = None) -> LineRequest:
    with Chip(path) as chip:
        return chip.request_lines(config=config, consumer=consumer, event_buffer_size=event_buffer_size,
                                  output_values=output_values)


class LineRequest:
    def __init__(self, board: Board, path: str, settings: dict[int, LineSettings], consumer: str | None):
        self.board = board  # a request outlives the block that installed its board (atexit closes)
        self.chip_path = path
        self.settings = settings
        self.consumer = consumer
        self.writes: list[tuple[int, Value]] = []  # every set_value, in order
        self._released = False

    def __bool__(self) -> bool:
        return not self._released

    def __enter__(self) -> LineRequest:
        self._check_released()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc_value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()

    def _check_released(self) -> None:
        if self._released:
            raise RequestReleasedError()

    def release(self) -> None:
        if not self._released:
            self._released = True
            for offset in self.settings:
                self.board.line(self.chip_path, offset).holder = None  # the level stays: nothing promises it

    def set_value(self, line: int | str, value: Value) -> None:
        self._check_released()
        if line not in self.settings:
            raise ValueError(f"unknown line name: {line}")
        if self.settings[line].direction != Direction.OUTPUT:
            raise NotImplementedError("the fake drives output lines only")
        self.writes.append((line, value))
        self.board.line(self.chip_path, line).drive(bool(value) != self.settings[line].active_low)

    # -------------------------------------------------------------- for tests: the one line's wire
    @property
    def line(self) -> FakeLine:
        (offset,) = self.settings
        return self.board.line(self.chip_path, offset)

    @property
    def state(self) -> bool:
        return self.line.state

    @property
    def history(self) -> list[tuple[float, bool]]:
        return list(self.line.history)


# The names the real package exports that edge.relay uses, mirrored (tests compare the two).
API = {"is_gpiochip_device": is_gpiochip_device, "request_lines": request_lines, "Chip": Chip,
       "ChipInfo": ChipInfo, "LineRequest": LineRequest, "LineSettings": LineSettings,
       "ChipClosedError": ChipClosedError, "RequestReleasedError": RequestReleasedError}
LINE_API = {"Value": Value, "Direction": Direction}


@contextlib.contextmanager
def installed(board: Board) -> Iterator[Board]:
    """`import gpiod` (and `gpiod.line`) gives this fake, over `board`, inside the block."""
    global _board
    line = types.ModuleType("gpiod.line")
    line.__dict__.update(LINE_API)
    module = types.ModuleType("gpiod")
    module.__dict__.update(API, line=line)
    saved = {name: sys.modules.get(name) for name in ("gpiod", "gpiod.line")}
    sys.modules.update({"gpiod": module, "gpiod.line": line})
    saved_board, _board = _board, board
    try:
        yield board
    finally:
        _board = saved_board
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


# ------------------------------------------------------------------ both relay backends in tests
BACKENDS = ("gpiozero", "gpiod")
CHIP = "/dev/gpiochip0"
LINE = 17  # as the Pi's GPIO17: one numbering in both backends' tests


def fake_board() -> Board:
    """One chip of 32 lines, line 17 named GPIO17 (as on a Raspberry Pi 5)."""
    return Board({CHIP: ["GPIO17" if i == LINE else "" for i in range(32)]})


@contextlib.contextmanager
def simulated_relay(backend: str, relay: RelayConfig) -> Iterator[Board | None]:
    """Inside the block `relay` drives a simulated line on `backend`: gpiozero's mock pins, or
    line LINE of CHIP on a fake gpiod board (yielded)."""
    if backend == "gpiozero":
        relay.backend, relay.pin_factory = "gpiozero", "mock"
        yield None
        return
    relay.backend, relay.chip, relay.line = "gpiod", CHIP, LINE
    with installed(fake_board()) as board:
        yield board
