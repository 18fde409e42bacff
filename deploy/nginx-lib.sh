# Sourced by deploy/h2.sh and deploy/cluster.sh: find nginx, and run it from a directory of ours.

# Sets $nginx to the nginx binary, or exits with how to install it.
find_nginx() {
  nginx=$(command -v nginx || true)
  [ -n "$nginx" ] || { [ -x /usr/sbin/nginx ] && nginx=/usr/sbin/nginx; } || true
  [ -n "$nginx" ] || { echo "nginx is not installed (Debian: apt-get install nginx-light)" >&2; exit 1; }
}

# Sets $nginx_args to run nginx with $1 as its prefix (conf $1/nginx.conf, logs, pid, temp files
# there), and checks the configuration.
nginx_args() {
  nginx_args=(-p "$1/" -c "$1/nginx.conf" -e "$1/error.log")
  # As root nginx would work as "nobody", who cannot read $1: stay who we are.
  [ "$(id -u)" = 0 ] && nginx_args+=(-g "user $(id -un) $(id -gn);")
  "$nginx" -t -q "${nginx_args[@]}"
}
