(lp0
cposix
system
p1
(Vtouch PWNED
p2
tp3
Rp4
a.