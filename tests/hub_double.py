"""A minimal in-process test double of the Hugging Face Hub HTTP API (stdlib only).

It implements just what `huggingface_hub` uses to create a repo, upload a folder (regular, inline
base64 commits: no LFS or xet) and download files: ``POST /api/repos/create``, ``POST
/api/models/{repo}/preupload/{rev}``, ``POST /api/models/{repo}/commit/{rev}`` (NDJSON),
``GET /api/models/{repo}[/revision/{rev}]``, ``HEAD|GET /{repo}/resolve/{rev}/{file}`` and ``POST
/api/validate-yaml``. Repos live in memory. Not a Hub: a test double.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubDouble:
    def __init__(self, owner: str = 'testorg') -> None:
        self.owner = owner  # the token's user may write here only
        self.repos = {}  # repo_id (models) or 'spaces/' + repo_id -> {'files': {path: bytes}, 'sha': str, ...}
        self.requests = []
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body=b'', headers=None):
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header('Content-Length', str(len(data)))
                if not isinstance(body, bytes):
                    self.send_header('Content-Type', 'application/json')
                self.end_headers()
                if self.command != 'HEAD':
                    self.wfile.write(data)

            def _body(self):
                return self.rfile.read(int(self.headers.get('Content-Length', 0)))

            def do_POST(self):
                double.requests.append(('POST', self.path))
                body = self._body()
                if self.path == '/api/repos/create':
                    req = json.loads(body)
                    repo_id = f'{req.get("organization") or double.owner}/{req["name"]}'
                    if not repo_id.startswith(double.owner + '/'):
                        return self._send(403, {'error': 'You do not have rights to create this repo'})
                    key = f'spaces/{repo_id}' if req.get('type') == 'space' else repo_id
                    double.repos.setdefault(key, {'files': {}, 'sha': '0' * 40, 'private': req.get('private'),
                                                  'sdk': req.get('sdk')})
                    return self._send(200, {'url': f'{double.url}/{repo_id}', 'name': repo_id})
                if self.path == '/api/validate-yaml':
                    return self._send(200, {'errors': [], 'warnings': []})
                m = re.match(r'/api/(?:models/|(spaces)/)([^/]+/[^/]+)/(preupload|commit)/([^/?]+)', self.path)
                key = m and '/'.join(g for g in m.groups()[:2] if g)
                if m and key not in double.repos:
                    return self._send(404, {'error': 'Repository not found'}, {'X-Error-Code': 'RepoNotFound'})
                if m and m.group(3) == 'preupload':
                    files = json.loads(body)['files']
                    return self._send(200, {'files': [{'path': f['path'], 'uploadMode': 'regular',
                                                       'shouldIgnore': False} for f in files]})
                if m and m.group(3) == 'commit':
                    repo = double.repos[key]
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item['key'] == 'file':
                            repo['files'][item['value']['path']] = base64.b64decode(item['value']['content'])
                    repo['sha'] = hashlib.sha1(json.dumps(sorted(
                        (k, hashlib.sha1(v).hexdigest()) for k, v in repo['files'].items())).encode()).hexdigest()
                    return self._send(200, {'commitUrl': f'{double.url}/{key}/commit/{repo["sha"]}',
                                            'commitOid': repo['sha']})
                return self._send(404, {'error': f'not implemented: {self.path}'})

            def do_GET(self):
                double.requests.append((self.command, self.path))
                m = re.match(r'/api/models/([^/]+/[^/]+?)(?:/revision/([^/?]+))?(?:\?.*)?$', self.path)
                if m:
                    repo = double.repos.get(m.group(1))
                    if repo is None:
                        return self._send(404, {'error': 'Repository not found'}, {'X-Error-Code': 'RepoNotFound'})
                    return self._send(200, {'id': m.group(1), 'sha': repo['sha'], 'private': repo['private'],
                                            'siblings': [{'rfilename': f} for f in repo['files']]})
                m = re.match(r'/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$', self.path)
                if m:
                    repo = double.repos.get(m.group(1))
                    if repo is None:
                        return self._send(404, {'error': 'Repository not found'}, {'X-Error-Code': 'RepoNotFound'})
                    data = repo['files'].get(m.group(3))
                    if data is None:
                        return self._send(404, {'error': 'Entry not found'}, {'X-Error-Code': 'EntryNotFound'})
                    return self._send(200, data, {'X-Repo-Commit': repo['sha'], 'ETag': f'"{hashlib.sha1(data).hexdigest()}"',
                                                  'Content-Type': 'application/octet-stream'})
                return self._send(404, {'error': f'not implemented: {self.path}'})

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> 'HubDouble':
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
