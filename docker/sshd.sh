#!/usr/bin/env bash
# Run an ssh server in the container, as the container's user (no root needed), for the deepspeed
# launcher's ssh/pdsh multi-node mode:
#   docker run -d --network host -v KEYS:/home/rct/.ssh:ro ... --entrypoint /opt/rct-dist-docker/sshd.sh IMAGE
# Listens on $SSHD_PORT (default 2222); accepts only the public keys in ~/.ssh/authorized_keys (or
# $AUTHORIZED_KEYS); password logins are off. Host keys are made on first start, per container, in
# $SSHD_DIR (default ~/.sshd); mount a volume there to keep them across restarts.
# ssh sessions do not inherit the container's environment (PATH with /opt/venv/bin, HF_HOME, ...): the
# variables listed below are handed on to every session with sshd's SetEnv.
set -euo pipefail
port=${SSHD_PORT:-2222}
dir=${SSHD_DIR:-$HOME/.sshd}
keys=${AUTHORIZED_KEYS:-$HOME/.ssh/authorized_keys}
mkdir -p -- "$dir"
chmod 700 -- "$dir"
for type in ed25519 rsa; do
    [[ -f $dir/ssh_host_${type}_key ]] || ssh-keygen -q -t "$type" -N '' -f "$dir/ssh_host_${type}_key"
done
# NAME="value" for SetEnv: the image's own settings and the usual CUDA/NCCL/torch ones, as set now.
setenv=()
while IFS= read -r name; do
    value=${!name}
    [[ $value == *'"'* || $value == *$'\n'* ]] && continue
    setenv+=("$name=\"$value\"")
done < <(compgen -e | grep -E '^(PATH|LD_LIBRARY_PATH|LANG|LC_ALL|HF_[A-Z_]*|TORCH_[A-Z_]*|RCT_[A-Z_]*|PYTHON[A-Z_]*|PIP_[A-Z_]*|DS_[A-Z_]*|CUDA_[A-Z_]*|NCCL_[A-Z_]*|OMP_NUM_THREADS)$' | sort)

[[ -s $keys ]] || echo "sshd.sh: warning: $keys is missing or empty: nobody can log in" >&2
cat > "$dir/sshd_config" <<CFG
Port $port
HostKey $dir/ssh_host_ed25519_key
HostKey $dir/ssh_host_rsa_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
AllowUsers $(id -un)
StrictModes no
PermitUserEnvironment no
Subsystem sftp internal-sftp
CFG
(( ${#setenv[@]} )) && printf 'SetEnv %s\n' "${setenv[*]}" >> "$dir/sshd_config"
exec /usr/sbin/sshd -D -e -f "$dir/sshd_config"
