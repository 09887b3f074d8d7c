"""Kernel configuration of the project's environment (copied to <env>/etc/ipython/ by tools/setup_env.py).

Two log lines of every kernel that Papermill or JupyterLab starts are not failures, yet read like them in the
terminal of `make report`:

- "Kernel is running over TCP without encryption": the kernel listens on the loopback interface only and
  every message is signed with the connection file's key (readable by this user alone);
- "KeyboardInterrupt caught in kernel": jupyter_client interrupts every kernel before shutting it down.

Exactly these two messages are dropped; every other message of the kernel's log stays.
"""
import logging

EXPECTED = ("Kernel is running over TCP without encryption", "KeyboardInterrupt caught in kernel")


class ExpectedKernelMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(EXPECTED)


logging.getLogger("IPKernelApp").addFilter(ExpectedKernelMessages())
