"""
Held logs: log records kept back until we know whether they help.

Libraries log before they fail: transformers prints a table of mismatched tensors before the
size error it raises, lm-eval lists the tasks and the model's arguments before a bad argument
stops it. When we turn such a failure into one line, those records would come first and bury
it. `HeldLogs` holds them at the loggers or handlers that would print them, then either
releases them in order (the step succeeded: the user sees what they would have seen, a little
late) or drops them (our one line says what they meant).
"""

import logging


class HeldLogs:
    """Holds every record that reaches the given loggers or handlers (`hold`), then prints them
    where they were going (`release`) or forgets them (`drop`). A `with` block drops what is
    still held when it ends, so no filter outlives it."""

    def __init__(self, *targets: logging.Filterer):
        self.held, self.filters = [], []  # (target, record) in arrival order; (target, filter)
        self.hold(*targets)

    def hold(self, *targets: logging.Filterer):
        for target in targets:
            def keep(record, target=target) -> bool:  # a filter that emits nothing now
                self.held.append((target, record))
                return False
            target.addFilter(keep)
            self.filters.append((target, keep))

    @property
    def records(self) -> list[logging.LogRecord]:
        return [record for _, record in self.held]

    def release(self):
        held = self.held
        self.drop()
        for target, record in held:  # a handler is handed each record as before, a logger its own
            if record.levelno >= target.level:
                target.handle(record)

    def drop(self):
        for target, keep in self.filters:
            target.removeFilter(keep)
        self.held, self.filters = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.drop()
