#!/usr/bin/env python3
"""Lists import circles between the source files of each crate: a file
naming another through `crate::` or `super::` paths is an arrow (doc
comments and unit-test modules left out, a child naming its own parent
not counted); a strongly connected set of more than one file is a circle.
Prints "cycles: []" per crate when there is none.

    python3 scripts/import_circles.py
"""
import os,re,sys
os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
def modpath(root, f):
    rel=os.path.relpath(f, root)[:-3]
    parts=rel.split('/')
    if parts[-1] in ('mod','lib','main'): parts=parts[:-1]
    return parts
for crate in ['node/src','coordinator/src','protocol/src']:
    files=[os.path.join(d,f) for d,_,fs in os.walk(crate) for f in fs if f.endswith('.rs')]
    mods={tuple(modpath(crate,f)):f for f in files}
    edges={}
    for m,f in mods.items():
        s=open(f).read()
        s=re.sub(r'//[^\n]*', '', s)
        s=re.sub(r'#\[cfg\(test\)\]\s*mod tests \{.*', '', s, flags=re.S)
        deps=set()
        for path in re.findall(r'\b((?:crate|super)(?:::\w+)+)', s):
            parts=path.split('::')
            if parts[0]=='crate': base=[]; parts=parts[1:]
            else:
                base=list(m)
                while parts and parts[0]=='super': base=base[:-1]; parts=parts[1:]
            # longest prefix that's a module
            full=base+parts
            for k in range(len(full),-1,-1):
                if tuple(full[:k]) in mods: 
                    t=tuple(full[:k]); break
            if t!=m: deps.add(t)
        # use super::* glob
        edges[m]=deps
    # find cycles excluding child->ancestor edges
    def is_anc(a,b): return len(a)<len(b) and b[:len(a)]==a
    g={m:{d for d in ds if not is_anc(d,m)} for m,ds in edges.items()}
    # tarjan SCC
    idx={};low={};st=[];on=set();res=[];c=[0]
    sys.setrecursionlimit(10000)
    def sc(v):
        idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
        for w in g.get(v,()):
            if w not in idx: sc(w);low[v]=min(low[v],low[w])
            elif w in on: low[v]=min(low[v],idx[w])
        if low[v]==idx[v]:
            comp=[]
            while True:
                w=st.pop();on.discard(w);comp.append(w)
                if w==v:break
            if len(comp)>1: res.append(comp)
    for v in g:
        if v not in idx: sc(v)
    print(crate, 'cycles:', ['/'.join('::'.join(x) or 'root' for x in comp) for comp in res])
