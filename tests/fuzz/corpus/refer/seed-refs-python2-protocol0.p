((S'ref_id'
I5
S'image_id'
I1
S'ann_id'
I10
S'split'
S'train'
S'sentences'
((S'raw'
S'caf\xe9 au lait'
S'sent'
S'cafe'
S'tokens'
(S'cafe'
lS'sent_id'
I0
dldl.