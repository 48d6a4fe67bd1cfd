# Helpers shared by the bench scripts (sourced, not run).

# A free TCP port on loopback.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# CPU time (user + system, in clock ticks) of process $1 so far.
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# The median of the numbers on stdin, one per line ("nan" if there are none).
median() {
  sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "nan"; exit} if(NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'
}
