#!/bin/bash
# Builds .dep/ (gitignored; carry it to the device with the repository): the project's Python dependencies
# that the GPU image lacks (uvicorn, starlette, pydantic with its cp312 core, typer and a few small ones),
# taken from the vLLM bundle (.vllmkit/p0, cp312 builds) and this machine's pure-Python installs. About 9 MB,
# against the bundle's 50 MB, which does not fit beside the repository in one call's 64 MiB carry.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .dep && mkdir -p .dep
cat .vllmkit/p0/bundle.part* | python3 -c "
import lzma, sys, tarfile
keep = {'uvicorn', 'starlette', 'multipart', 'python_multipart', 'pydantic', 'pydantic_core', 'annotated_types',
        'typing_inspection', 'sniffio'}
t = tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|')
for m in t:
    parts = m.name.split('/')
    if len(parts) >= 2 and parts[0] == 'site' and (parts[1] in keep or parts[1].split('-')[0] in keep):
        m.name = '/'.join(parts[1:])
        t.extract(m, '.dep')
"
site=$(python3 -c "import typer, os; print(os.path.dirname(os.path.dirname(typer.__file__)))")
for p in typer shellingham annotated_doc; do cp -r "$site/$p" .dep/; done
grep -qx "/.dep/" .git/info/exclude || echo "/.dep/" >> .git/info/exclude
du -sh .dep
