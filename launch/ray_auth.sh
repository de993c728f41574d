# Sourced by start_head.sh and join_worker.sh (not a command): Ray's token authentication, set explicitly.
#
# Ray 2.60 otherwise decides by itself, from whether a token file happens to exist, and a node without it lets
# anyone who reaches its ports run code as you. The token is Ray's own: $RAY_AUTH_TOKEN, else the file
# $RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token (which Ray's own tools, `ftcluster jobs` and ftcluster's
# clients read too). The file is kept readable by its owner only (0600).

# ray_token_setup SCRIPT CREATE: export RAY_AUTH_MODE=token and the token's place; CREATE=1 (a head) makes the
# default token file when it is missing, CREATE=0 (a joining node) needs the head's token.
ray_token_setup() {
  export RAY_AUTH_MODE=token
  if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
    ray_token_shown="\$RAY_AUTH_TOKEN"
    return
  fi
  local file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
  if [[ ! -s $file ]]; then
    if [[ $2 != 1 || -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
      echo "$1: no Ray token at $file: the cluster uses Ray's token authentication. Copy the head's token file" \
           "(launch/start_head.sh printed where it is) to this machine, chmod 600, and set RAY_AUTH_TOKEN_PATH" \
           "to it (or set RAY_AUTH_TOKEN)" >&2
      exit 1
    fi
    mkdir -p -m 700 "$(dirname "$file")"
    # Written whole under a private name, then linked into place: a head starting at the same moment either
    # wins the link or uses the complete token of the one that did.
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$file.$$")
    ln "$file.$$" "$file" 2>/dev/null || true
    rm -f "$file.$$"
  fi
  # ray.init and `ray get-auth-token --generate` create it with the umask's mode (often readable by all).
  chmod 600 "$file"
  export RAY_AUTH_TOKEN_PATH=$file
  ray_token_shown=$file
}
