"""The embedded broker's fix of amqtt's retained-message quirk is written against one amqtt
release: these fail when another is installed, so that the fix is checked again."""

from __future__ import annotations

import inspect

import amqtt
from amqtt.broker import Broker

from nsync_mqtt.broker_embed import AMQTT_VERSION, _Broker


def test_the_installed_amqtt_is_the_one_the_fix_was_written_for() -> None:
    assert amqtt.__version__ == AMQTT_VERSION


def test_the_quirk_is_where_the_fix_expects_it() -> None:
    # at CONNECT, amqtt publishes the retained messages of every filter in its table
    connect = inspect.getsource(Broker._handle_client_session)
    assert "for topic in self._subscriptions:" in connect
    assert "_publish_retained_messages_for_subscription((topic, QOS_0), client_session)" in connect
    # the fix narrows that one method, keeping its signature
    fixed = inspect.signature(_Broker._publish_retained_messages_for_subscription)
    original = inspect.signature(Broker._publish_retained_messages_for_subscription)
    assert list(fixed.parameters) == list(original.parameters)
