# escape.sh PIDFILE: a task that leaves a process behind the way a daemon
# would: forked twice, in a session of its own, ignoring SIGTERM. The
# process writes its pid to PIDFILE. The script itself ignores SIGTERM too,
# so only a SIGKILL ends it.
case "$1" in
child) echo $$ > "$2.tmp" && mv "$2.tmp" "$2"; trap '' TERM; exec sleep 1000 ;;
detach) sh "$0" child "$2" & exit 0 ;;
esac
setsid sh "$0" detach "$1"
trap '' TERM
sleep 1000
