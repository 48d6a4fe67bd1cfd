# Helpers shared by the bench scripts (sourced, not run).

# A free TCP port on loopback.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# CPU time (user + system, in clock ticks) of process $1 so far.
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# Writes every dirty page back before a timed run, so that no job pays for the writeback of
# what the one before left dirty (512 MiB of random 4 KiB writes, for one), whichever server
# that was. (It did not steady the 1 MiB file write rows: see the README.)
settle() { sync; }

# The median of the numbers on stdin, one per line ("nan" if there are none).
median() {
  sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "nan"; exit} if(NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'
}

# The config of one write-back cache export, "disk": cache -> sharded -> file, 1 GiB, cache 2 GiB
# with max_dirty 2 GiB, listening on 127.0.0.1:$1, cache and store under directory $2, flush = $3.
cache_toml() {
  printf '[server]\nlisten = ["127.0.0.1:%s"]\n[exports.disk]\npipeline = "cache -> sharded -> file"\nsize = "1GiB"\n[exports.disk.file]\npath = "%s/store"\n[exports.disk.cache]\npath = "%s/cache"\nsize = "2GiB"\nmax_dirty = "2GiB"\nflush = "%s"\n' \
    "$1" "$2" "$2" "$3"
}
