"""The plan's message actions: messages queued through core and Twilio status callbacks."""

from __future__ import annotations

import string
import time
from urllib.parse import urlencode

from bench.soak.common import (
    CALLBACK_PATH,
    TWILIO_TOKEN,
)
from bench.soak.model import http_post
from core import messages, outbox
from core.db import run_in_transaction
from tests.support.fakes.fake_twilio import (
    signed_status_callback,
    status_callback_params,
)


class MessageActions:
    """Mixed into Plan: messages queued through core and their status callbacks."""

    def _message(self) -> None:
        org = self.org()
        self.message_seq += 1
        length = self.rng.choice((40, 150, 200, 320))
        head = f"soak {self.seed}-{self.message_seq:06d} "
        body = head + self._chars(string.ascii_lowercase, max(1, length - len(head)))
        to = f"+1202555{self.rng.randint(0, 9999):04d}"
        choices = [None, *self.campaigns.get(org, [])]
        campaign = self.rng.choice(choices)
        self.timeline.at(time.monotonic(), lambda: self.queue_message(org, to, body, campaign))

    def queue_message(self, org: str, to: str, body: str, campaign: str | None) -> None:
        """What the host application does: queue in its own transaction, publish after commit
        (a failed publish is left to the outbox relay)."""
        stack = self.stack
        try:
            msg = run_in_transaction(
                stack.engine,
                lambda c: messages.queue(c, org, to, body, stack.policy, campaign_id=campaign),
            )
        except Exception as exc:
            with self.stats.lock:
                self.stats.queue_errors[type(exc).__name__] += 1
            return
        with self.lock:
            self.body_to_message[body] = msg.message_id
        with self.stats.lock:
            self.stats.queued += 1
        try:
            stack.publisher().publish(messages.SEND_TASK, [msg.message_id])
            run_in_transaction(
                stack.engine,
                lambda c: outbox.mark_task_published(c, messages.SEND_TASK, [msg.message_id]),
            )
        except Exception:
            with self.stats.lock:
                self.stats.publish_deferred += 1

    def _callback(self) -> None:
        created = [m for m in self.stack.twilio.messages() if m["sid"] not in self.called_back]
        if not created:
            return self._message()
        m = self.rng.choice(created)
        self.called_back.add(m["sid"])
        final = "failed" if self.rng.random() < 0.3 else "delivered"
        plan = [final]
        if self.rng.random() < 0.3:
            plan.append("sent")  # a stale status after the final one: must not move it back
        if self.rng.random() < 0.2:
            plan.append(final)  # Twilio retried the callback
        for i, status in enumerate(plan):
            self.timeline.at(
                time.monotonic() + 0.3 * i,
                lambda s=status, last=i == 0: self.post_callback(m, s, final=last),
            )

    def post_callback(self, m: dict, status: str, *, final: bool) -> None:
        params = status_callback_params(m["sid"], status, m["account_sid"], m["to"], m["from"])
        url = self.stack.public_url + CALLBACK_PATH
        params, signature = signed_status_callback(TWILIO_TOKEN, url, params)
        headers = {
            "X-Twilio-Signature": signature,
            "Content-Type": "application/x-www-form-urlencoded",
        }
        code, _, _ = http_post(
            self.stack.web_port, CALLBACK_PATH, urlencode(params).encode(), headers
        )
        with self.stats.lock:
            self.stats.callbacks[f"{status} -> {code or 'connection error'}"] += 1
        if final:
            with self.lock:
                self.terminal_callback[m["sid"]] = (status, code == 200)
