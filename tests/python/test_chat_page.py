"""The chat page at GET / in a real headless browser (Debian's chromium and chromedriver,
driven by Selenium) against the real server on the default model, which requires an API key:
the page asks for the key, lists the model, streams a reply as it arrives, stops a long one
(the server then frees its KV blocks), and keeps the conversation's history."""
import json
import os
import shutil
import time
import urllib.request

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import API_KEY, MODEL

CHROMIUM = os.environ.get("WICK_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("WICK_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser():
    # scripts/python-tests.sh installs Debian's chromium and chromium-driver when missing.
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), (
        "the chat page test needs chromium and chromedriver (apt-get install chromium chromium-driver)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def metric(base, name):
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def tokens(base, messages):
    req = urllib.request.Request(
        base + "/tokenize",
        data=json.dumps({"model": MODEL, "messages": messages}).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer " + API_KEY},
    )
    return json.load(urllib.request.urlopen(req))["count"]


def replies(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")


def send(driver, text):
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def test_chat_page_streams_stops_and_keeps_history(server, browser):
    d = browser
    d.get(server + "/")
    assert d.title == "Wick"
    wait = WebDriverWait(d, 30, poll_frequency=0.05)

    # The server requires a key: the page asks for it, then lists the chat model.
    wait.until(lambda d: d.find_element(By.ID, "keybox").is_displayed())
    d.find_element(By.ID, "apikey").send_keys(API_KEY)
    d.find_element(By.ID, "savekey").click()
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) > 0)
    assert [o.text for o in Select(d.find_element(By.ID, "model")).options] == [MODEL]

    # A long reply (greedy decoding of this prompt loops until max_tokens): the text grows
    # while it streams; Stop closes the stream, and the server frees the sequence's KV
    # blocks. System prompt and sampling settings come from the side panel.
    d.find_element(By.ID, "system").send_keys("You are a helpful assistant.")
    for field, value in (("temperature", "0"), ("maxtokens", "4000")):
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    send(d, "Write a very long story about a dragon who learns to bake bread.")
    wait.until(lambda d: len(replies(d)) == 1)
    reply = replies(d)[-1]
    lengths = []
    deadline = time.time() + 30
    while len(set(lengths)) < 3 and time.time() < deadline:
        lengths.append(len(reply.find_element(By.CLASS_NAME, "text").text))
        time.sleep(0.1)
    seen = sorted(set(lengths))
    assert len(seen) >= 3 and seen[-1] > 0, f"streamed text should grow: {lengths}"
    assert reply.get_attribute("data-done") is None, "still streaming before Stop"
    assert metric(server, "wick_kv_cache_blocks_used") > 0
    d.find_element(By.ID, "stop").click()
    wait.until(lambda d: reply.get_attribute("data-done") == "stopped")
    deadline = time.time() + 10
    while metric(server, "wick_kv_cache_blocks_used") > 0:
        assert time.time() < deadline, "KV blocks not freed after Stop"
        time.sleep(0.1)
    assert metric(server, "wick_requests_running") == 0

    # A short reply, with its tokens/s.
    el = d.find_element(By.ID, "maxtokens")
    el.clear()
    el.send_keys("24")
    send(d, "Name three colours.")
    wait.until(lambda d: len(replies(d)) == 2 and replies(d)[-1].get_attribute("data-done"))
    first = replies(d)[-1]
    assert first.get_attribute("data-done") == "finished", first.text
    text = first.find_element(By.CLASS_NAME, "text").text
    assert text.strip()
    stats = first.find_element(By.CLASS_NAME, "stats")
    assert 0 < int(stats.get_attribute("data-tokens")) <= 24
    assert float(stats.get_attribute("data-rate")) > 0, stats.text
    assert "tokens/s" in stats.text

    # History: a third turn is sent with the earlier ones (its prompt is longer than the
    # first turn's alone would be) and the page shows all six messages.
    el = d.find_element(By.ID, "maxtokens")
    el.clear()
    el.send_keys("8")
    before = metric(server, "wick_prompt_tokens_total")
    alone = tokens(server, [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Thanks!"},
    ])
    send(d, "Thanks!")
    wait.until(lambda d: len(replies(d)) == 3 and replies(d)[-1].get_attribute("data-done"))
    assert replies(d)[-1].get_attribute("data-done") == "finished"
    assert len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 6
    sent = metric(server, "wick_prompt_tokens_total") - before
    assert sent > alone + 20, f"the earlier turns are sent: {sent} tokens, {alone} alone"
