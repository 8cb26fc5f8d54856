#!/usr/bin/env python3
"""Opens a page of web/ in headless Chromium (through chromedriver's WebDriver HTTP API, no
packages needed), waits for its verdict (document.body.dataset.verdict), prints what it
reported and exits 0 only on "pass".

    python3 web/ci/browser.py index.html?quick=1 [--screenshot web/screenshot.png] [--json out.json]
    python3 web/ci/browser.py "tint.html?dir=target/shaders/"

Serves web/ on a free localhost port. Chromium flags: headless with WebGPU enabled, which gives
the SwiftShader adapter on a machine without a GPU, and no background networking (this
machine's network is closed).
"""
import argparse, base64, functools, http.server, json, os, socket, subprocess, sys, threading, time
import urllib.request

WEB = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    "--headless=new", "--no-sandbox", "--enable-unsafe-webgpu",
    "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--window-size=1280,2000",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["value"]


class Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript", ".wasm": "application/wasm"}

    def log_message(self, *a):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("page")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--screenshot")
    ap.add_argument("--json")
    ap.add_argument("--flags", default="", help="extra Chromium flags, space-separated")
    a = ap.parse_args()

    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Quiet, directory=WEB))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    dport = free_port()
    driver = subprocess.Popen(["chromedriver", f"--port={dport}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{dport}"
    code = 1
    try:
        for _ in range(100):
            try:
                call(base, "GET", "/status")
                break
            except Exception:
                time.sleep(0.1)
        flags = FLAGS + [f for f in a.flags.split() if f]
        sess = call(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": os.environ.get("CHROMIUM", "/usr/bin/chromium"), "args": flags}}}})
        sid = sess["sessionId"]
        s = f"/session/{sid}"
        try:
            call(base, "POST", s + "/timeouts", {"script": 600000})
            url = f"http://127.0.0.1:{port}/{a.page}"
            print(f"opening {url}", flush=True)
            call(base, "POST", s + "/url", {"url": url})
            t0 = time.time()
            verdict = ""
            while time.time() - t0 < a.timeout:
                verdict = call(base, "POST", s + "/execute/sync",
                               {"script": "return document.body ? (document.body.dataset.verdict || '') : ''", "args": []})
                if verdict:
                    break
                time.sleep(1)
            report = call(base, "POST", s + "/execute/sync",
                          {"script": "return JSON.stringify(window.selattnReport || window.tintResult || null)", "args": []})
            text = call(base, "POST", s + "/execute/sync",
                        {"script": "return document.body.innerText", "args": []})
            print(text)
            print(f"verdict after {time.time() - t0:.0f} s: {verdict or 'none (timed out)'}")
            if a.json and report:
                with open(a.json, "w") as f:
                    f.write(json.dumps(json.loads(report), indent=2))
            if a.screenshot:
                png = call(base, "GET", s + "/screenshot")
                with open(a.screenshot, "wb") as f:
                    f.write(base64.b64decode(png))
            code = 0 if verdict == "pass" else 1
        finally:
            call(base, "DELETE", s)
    finally:
        driver.terminate()
        driver.wait()
        httpd.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
