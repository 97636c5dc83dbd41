#!/bin/sh
# Drop-in replacement for flannel's mk-docker-opts.sh, for units that keep the old name:
#   ExecStartPost=/opt/kubernetes/bin/mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d /run/flannel/docker
# Same flags (-f -d -i -c -k -m) and output; see `overlay-agent mk-docker-opts --help`.
#
# The agent it runs: $OVERLAY_AGENT if set; else overlay-agent installed beside this script
# (the seed puts both into /opt/kubernetes/bin, which is not on systemd's PATH); else
# overlay-agent on PATH.
if [ -n "${OVERLAY_AGENT:-}" ]; then
    agent=$OVERLAY_AGENT
else
    here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
    if [ -n "$here" ] && [ -x "$here/overlay-agent" ]; then
        agent=$here/overlay-agent
    elif command -v overlay-agent >/dev/null 2>&1; then
        agent=overlay-agent
    else
        echo "mk-docker-opts.sh: overlay-agent is neither beside this script (in ${here:-?}) nor on PATH; install it there or set OVERLAY_AGENT=/path/to/overlay-agent" >&2
        exit 127
    fi
fi
exec "$agent" mk-docker-opts "$@"
