"""`timm-bcos serve` for real: a server subprocess on 127.0.0.1, its ``explain`` API through
gradio_client, the page in a headless Chromium driven by selenium, and a Space folder's ``app.py``
serving a model from a local Hub double."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import timm_bcos
from timm_bcos.app.explorer import DEFAULT_MODEL, on_black
from timm_bcos.data import demo_images, load_images
from timm_bcos.hub import publish

from hub_double import HubDouble

ARTEFACTS = Path(__file__).resolve().parents[2] / 'out'
CHROMIUM, DRIVER = shutil.which('chromium'), shutil.which('chromedriver')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _start(cmd, port, cwd=None, env=None, timeout=180):
    """Start a server subprocess; return it and its URL once it prints that it is ready."""
    env = {**os.environ, 'GRADIO_ANALYTICS_ENABLED': 'False', 'OMP_NUM_THREADS': '1', **(env or {})}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, t0 = [], time.perf_counter()
    for line in proc.stdout:
        lines.append(line)
        if 'ready at' in line:
            url = f'http://127.0.0.1:{port}/'
            print(f'{" ".join(cmd[-4:])}: ready in {time.perf_counter() - t0:.1f} s')
            return proc, url
        if time.perf_counter() - t0 > timeout:
            break
    proc.kill()
    raise AssertionError(f'server did not start: {"".join(lines)[-3000:]}')


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope='module')
def server():
    port = _free_port()
    proc, url = _start([sys.executable, '-m', 'timm_bcos.cli', 'serve', '--port', str(port)], port)
    yield url
    _stop(proc)


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _check_explain_api(url, image, model_name, model):
    """`explain` through gradio_client equals `timm_bcos.explain` on the same image."""
    from gradio_client import handle_file

    t = time.perf_counter()
    labels, picture = _client(url).predict(handle_file(image), model_name, api_name='/explain')
    print(f'explain API: {time.perf_counter() - t:.2f} s per image (first call)')
    e = timm_bcos.explain(model, load_images(model, [image]), k=5)
    names = model.pretrained_cfg['label_names']
    assert [c['label'] for c in labels['confidences']] == [names[int(c)] for c in e.targets[0]]
    np.testing.assert_allclose([c['confidence'] for c in labels['confidences']], e.probabilities[0].numpy(),
                               rtol=1e-5, atol=1e-7)
    shown = np.asarray(Image.open(picture).convert('RGB'))
    assert shown.shape == (224, 224, 3)
    np.testing.assert_array_equal(shown[::7, ::7], on_black(e.to_rgba(0, 0)))


def test_api_explain_matches_model_explain(server):
    model = timm_bcos.load_model(DEFAULT_MODEL)
    for image in demo_images()[4:6]:
        _check_explain_api(server, image, DEFAULT_MODEL, model)
    from gradio_client import handle_file

    client = _client(server)
    t = time.perf_counter()
    client.predict(handle_file(demo_images()[4]), DEFAULT_MODEL, api_name='/explain')
    print(f'explain API, cached image: {time.perf_counter() - t:.2f} s')


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        message = 'chromium + chromium-driver not installed (apt-get install chromium chromium-driver)'
        if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
            pytest.fail(message + ' (required in CI)')
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
                '--window-size=1400,1000'):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, css, timeout=60, image=False, text=None):
    """The first element matching `css` (and holding `text`) once there is one (an image: once it is
    loaded and drawn)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def found(d):
        hits = [h for h in d.find_elements(By.CSS_SELECTOR, css) if text is None or text in h.text]
        if hits and image and not d.execute_script(
                'const i = arguments[0]; return i.complete && i.naturalWidth > 0 && i.height > 100', hits[0]):
            return []
        return hits
    return WebDriverWait(driver, timeout).until(found)[0]


def test_browser_uploads_an_image_and_sees_its_explanation(server, browser, tmp_path):
    import io

    t = time.perf_counter()
    browser.get(server)
    upload = _wait(browser, '#image input[type=file]')
    print(f'page loaded in {time.perf_counter() - t:.1f} s')
    t = time.perf_counter()
    upload.send_keys(demo_images()[3])
    shown = _wait(browser, '#explanation img', image=True)
    _wait(browser, '#eq13 strong')
    print(f'explanation shown {time.perf_counter() - t:.1f} s after the upload')
    ARTEFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTEFACTS / 'explorer.png'))
    pixels = np.asarray(Image.open(io.BytesIO(shown.screenshot_as_png)).convert('RGB')).astype(float)
    assert pixels.shape[0] > 100 and pixels.std() > 10  # a drawn explanation, not a blank box
    text = browser.find_element('css selector', '#eq13').text
    assert 'Eq. 13' in text and float(text.split('error of')[1].strip(' .')) < 1e-5
    model = timm_bcos.load_model(DEFAULT_MODEL)
    top = timm_bcos.explain(model, load_images(model, [demo_images()[3]])).prediction[0]
    assert model.pretrained_cfg['label_names'][int(top)] in browser.find_element('css selector', '#classes').text

    for tab, button, shown in (('Compare', '#run-compare', '#compare-posthoc img'),
                               ('Inner neuron', '#run-neuron', '#neuron img')):
        next(b for b in browser.find_elements('css selector', 'button[role=tab]') if b.text == tab).click()
        _wait(browser, button).click()
        pixels = np.asarray(Image.open(io.BytesIO(_wait(browser, shown, image=True).screenshot_as_png)))
        assert pixels.std() > 10, tab
        browser.save_screenshot(str(ARTEFACTS / f'explorer-{tab.split()[-1].lower()}.png'))
    assert 'Eq. 13' in browser.find_element('css selector', '#neuron-info').text

    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'not a picture')
    browser.get(server)  # a fresh page
    _wait(browser, '#image input[type=file]').send_keys(str(bad))
    message = _wait(browser, '.toast-message-text', timeout=30, text='cannot read broken.png')
    assert 'not an image file' in message.text and 'Traceback' not in browser.page_source


def test_space_app_serves_a_model_from_the_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)  # this test talks to its own local server only
    model = timm_bcos.load_model(DEFAULT_MODEL)
    with HubDouble(owner='testorg') as hub:
        publish(model, 'testorg/explorer', token='hf_test', endpoint=hub.url, out_dir=str(tmp_path / 'repo'),
                space=True, images=[])
        space = tmp_path / 'repo-space'
        assert set(hub.repos['spaces/testorg/explorer']['files']) == {'README.md', 'app.py', 'requirements.txt'}
        port = _free_port()
        env = dict(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE='0', HF_HOME=str(tmp_path / 'hf'), GRADIO_SERVER_PORT=str(port))
        proc, url = _start([sys.executable, 'app.py'], port, cwd=space, env=env)
        try:
            _check_explain_api(url, demo_images()[6], 'hf-hub:testorg/explorer', model)
        finally:
            _stop(proc)
        assert any('/testorg/explorer/resolve/' in path for _, path in hub.requests)  # loaded through the Hub
