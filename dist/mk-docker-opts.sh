#!/bin/sh
# Drop-in replacement for flannel's mk-docker-opts.sh, for units that keep the old name:
#   ExecStartPost=/opt/kubernetes/bin/mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d /run/flannel/docker
# Same flags (-f -d -i -c -k -m) and output; see `overlay-agent mk-docker-opts --help`.
exec "${OVERLAY_AGENT:-overlay-agent}" mk-docker-opts "$@"
