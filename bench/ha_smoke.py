"""Drives bench/ha_smoke.sh's real Home Assistant over its REST API: onboarding, the MQTT
integration, NSync added from its config flow, and the media player's services against the real
cluster. Exits non-zero naming the first check that failed.

    .venv/bin/python bench/ha_smoke.py MEDIA_DIR   # MEDIA_DIR served on 127.0.0.1:18124
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nsync_mqtt.tones import make_tone_wav

HA = "http://127.0.0.1:18123"
CID = HA + "/"
MEDIA_URL = "http://127.0.0.1:18124"
PLAYER = "media_player.nsync_home"
token: str | None = None


def req(method: str, path: str, body: dict[str, Any] | None = None, form: bool = False) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        if form:
            data = urllib.parse.urlencode(body).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
    r = urllib.request.Request(HA + path, data=data, headers=headers, method=method)
    with urllib.request.urlopen(r, timeout=60) as resp:
        text = resp.read().decode()
    return json.loads(text) if text else None


def flow(handler: str, *steps: dict[str, Any]) -> dict[str, Any]:
    """Start a config flow and answer its forms with ``steps``; the last result."""
    f = req("POST", "/api/config/config_entries/flow", {"handler": handler})
    for answer in steps:
        f = req("POST", f"/api/config/config_entries/flow/{f['flow_id']}", answer)
    return dict(f)


def service(name: str, **data: Any) -> None:
    req("POST", f"/api/services/media_player/{name}", {"entity_id": PLAYER, **data})


def state(entity: str) -> dict[str, Any] | None:
    try:
        return dict(req("GET", f"/api/states/{entity}"))
    except urllib.error.HTTPError:
        return None


def until(check: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 20.0) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        st = state(PLAYER)
        if st is not None and check(st):
            return st
        time.sleep(0.3)
    sys.exit(f"FAILED waiting for {what}: {state(PLAYER)}")


def title(st: dict[str, Any]) -> Any:
    return st["attributes"].get("media_title")


def wait_up() -> None:
    for _ in range(900):
        try:
            urllib.request.urlopen(HA + "/auth/providers", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (onboarding not done yet)
        except OSError:
            time.sleep(1)
    sys.exit("FAILED: Home Assistant did not come up")


def main() -> None:
    global token
    media = Path(sys.argv[1])
    song = make_tone_wav(20.0, 440.0, "Sunday Morning", "The Testers")
    (media / "Sunday Morning.wav").write_bytes(song)
    with wave.open(str(media / "untagged doorbell.wav"), "wb") as w:  # no tags at all
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(bytes(4 * 44100 * 2))

    wait_up()
    user = {"client_id": CID, "name": "Tester", "username": "tester", "password": "pw-12345"}
    code = req("POST", "/api/onboarding/users", {**user, "language": "en"})["auth_code"]
    grant = {"grant_type": "authorization_code", "code": code, "client_id": CID}
    token = req("POST", "/auth/token", grant, form=True)["access_token"]
    print("onboarded, logged in")
    mqtt = flow("mqtt", {"broker": "127.0.0.1", "port": 18830})
    print("MQTT integration:", mqtt["type"], mqtt.get("title"))
    added = flow("nsync", {"cluster": "home"})
    print("NSync added from its config flow:", added["type"], added.get("title"))
    if added["type"] != "create_entry":
        sys.exit(f"FAILED: {added}")

    st = until(lambda s: s["state"] != "unavailable", "the player")
    print("player:", st["state"], "volume", st["attributes"].get("volume_level"))
    service(
        "play_media",
        media_content_id=f"{MEDIA_URL}/Sunday%20Morning.wav",
        media_content_type="music",
    )
    st = until(lambda s: s["state"] == "playing" and title(s) == "Sunday Morning", "playing")
    a = st["attributes"]
    print(
        "play_media:", st["state"], title(st), "/", a.get("media_artist"), a.get("media_duration")
    )
    time.sleep(3)
    service(
        "play_media",
        media_content_id=f"{MEDIA_URL}/untagged%20doorbell.wav",
        media_content_type="music",
        announce=True,
    )
    st = until(lambda s: title(s) == "untagged doorbell", "the announcement")
    print("announce:", st["state"], title(st))
    st = until(lambda s: title(s) == "Sunday Morning", "back to the song", 15)
    print("after the announcement:", st["state"], title(st), st["attributes"].get("media_position"))
    service("volume_set", volume_level=0.3)
    until(lambda s: s["attributes"].get("volume_level") == 0.3, "volume 0.3")
    service("media_pause")
    print("pause:", until(lambda s: s["state"] == "paused", "paused")["state"])
    service("clear_playlist")
    print("clear_playlist:", until(lambda s: s["state"] == "idle", "idle")["state"])
    states = {s["entity_id"]: s["state"] for s in req("GET", "/api/states")}
    ours = sorted(e for e in states if "nsync" in e and not e.startswith("media_player"))
    for entity in ours:
        print(f"  {entity}: {states[entity]}")
    if "button.nsync_home_play" not in states:
        sys.exit("FAILED: no entities from the cluster's MQTT discovery")
    print("ALL OK")


if __name__ == "__main__":
    main()
