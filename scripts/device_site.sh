# Source on the device machine: makes `import loraplex` work from a copy of the tree (no pip install there).
mkdir -p /tmp/site && rm -rf /tmp/site/loraplex && cp -r core /tmp/site/loraplex
for d in plugins resolvers kernels contrib; do cp -r "$d" "/tmp/site/loraplex/$d"; done
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
