#!/usr/bin/env python3
"""Generate the load-test dialogue corpus: loadtest/corpus/{en,zh}.json.

Multi-turn English and Chinese dialogues between a user and an assistant, from about 50 to about
6,000 tokens (counted with the production model's Qwen3 tokenizer), in which the user mentions
facts about themselves, plans with dates, stated preferences and repeated choices: the material
the three extraction branches look for. The text is assembled from sentence templates with a
fixed seed, so the same command writes the same files.

    python3 loadtest/gen_corpus.py                      # writes loadtest/corpus/{en,zh}.json
    python3 loadtest/gen_corpus.py --tokenizer DIR      # DIR/tokenizer.json (default: the Qwen3
                                                        # tokenizer that scripts/fetch-models.sh fetches)

Token counts need the `tokenizers` Python package (`pip install --target .cache/pydeps tokenizers`;
that folder is searched too). Without it the counts are estimated (about 1.3 tokens per English
word, 0.7 per Chinese character) and the files say so in their `counted_with` field.
"""
import argparse
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, ".cache", "pydeps"))

# Target sizes (tokens of all message contents) and how many dialogues of each size per language.
SIZES = [(50, 4), (150, 4), (400, 4), (1000, 3), (2000, 3), (4000, 2), (6000, 2)]
SEED = 20251122

EN = {
    "names": ["Alex", "Maya", "Daniel", "Priya", "Tom", "Sofia", "Kenji", "Laura", "Omar", "Emma"],
    "cities": ["Hangzhou", "Berlin", "Austin", "Lisbon", "Toronto", "Singapore", "Leeds", "Denver"],
    "jobs": ["backend developer", "product manager", "nurse", "high-school teacher", "data analyst",
             "UX designer", "civil engineer", "accountant", "chef", "PhD student in biology"],
    "hobbies": ["badminton", "bouldering", "trail running", "playing the piano", "baking sourdough",
                "birdwatching", "chess", "gardening", "photography", "swimming"],
    "foods": ["vegetarian food", "spicy Sichuan dishes", "sushi", "home-made pasta", "Thai curry"],
    "places": ["Kyoto", "Beijing", "Guangzhou", "Barcelona", "Reykjavik", "Chiang Mai", "Vancouver"],
    "weekdays": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"],
    "family": ["my daughter", "my son", "my wife", "my husband", "my parents", "my sister"],
    "facts": [
        "I'm {name}, {age}, a {job} in {city}.",
        "I play {hobby} most weekends, usually on Saturday mornings.",
        "{family} and I just moved to a flat near the river in {city}.",
        "I switched from coffee to green tea last month because I was sleeping badly.",
        "I started a new job as a {job} three weeks ago.",
        "I have a golden retriever called Biscuit who needs two walks a day.",
        "{family_cap} starts a new school in September, so our mornings are busy now.",
        "I'm allergic to peanuts, so I always check labels.",
        "I've been learning Spanish on my phone for about half a year.",
        "I run 5 km before work and track it on my watch.",
    ],
    "plans": [
        "I'm flying to {place} next {weekday} for a conference and staying four nights.",
        "We're planning a family trip to {place} this summer with {family}.",
        "My performance review is on the {day}th, I need to prepare a summary of my projects.",
        "I booked a dentist appointment for next {weekday} at 9 in the morning.",
        "I want to sign up for a half marathon in October.",
        "On {weekday} I have a call with a client in {city} about the new contract.",
    ],
    "prefs": [
        "Please keep your replies short, I don't like long explanations.",
        "I prefer window seats and morning flights.",
        "Always give me prices in euros, please.",
        "I like {food} a lot, suggest that when you can.",
        "Use Markdown for documents, and code blocks should have syntax highlighting.",
        "I don't want hotel suggestions above 150 a night.",
        "I'd rather take the train than fly when the trip is under five hours.",
    ],
    "choices": [
        "Let's go with the vegetarian option again.",
        "The quiet hotel away from the centre, like last time.",
        "No, skip the museum, I'd rather walk around the old town.",
        "The shorter version is better, thanks.",
        "Book the earliest train again, please.",
    ],
    "asks": [
        "Can you help me plan the next few days?",
        "What do you think I should do about that?",
        "Could you draft a short checklist for me?",
        "Any ideas for dinner tonight?",
        "How should I split the work this week?",
    ],
    "replies": [
        "Sure, here is a plan that fits what you told me.",
        "Noted, I'll keep that in mind.",
        "That sounds like a good idea. A few thoughts:",
        "Thanks for telling me. Here's a suggestion.",
        "Got it. Let me put that together.",
    ],
    "filler": [
        "Start with the tasks that have a fixed date and leave the flexible ones for the afternoon.",
        "If the weather turns, the indoor market near the station is a good fallback and it opens at eight.",
        "Keep an hour free after lunch, meetings in the first week tend to run over.",
        "A simple rule helps: write down the three things that must happen today before opening email.",
        "For the flight, check in online the day before and keep the boarding pass on your phone.",
        "The old town is compact, so most sights are within a twenty-minute walk of each other.",
        "Prepare a one-page summary: goals, what shipped, what slipped and why, and next quarter's plan.",
        "Batch the errands by area so that you cross the city only once.",
        "A light dinner with vegetables and rice will not keep you up at night.",
        "Set a reminder a week before the deadline so that nothing is left for the last evening.",
        "The train takes a little longer door to door but you can work for most of the journey.",
        "Stretch for ten minutes after each run; it makes the next morning much easier.",
        "Keep receipts in one folder, it makes the expense report a five-minute job.",
        "If the client asks about timelines, give a range rather than a single date.",
    ],
    "notes": "Here are my notes from this week, can you tidy them up?",
}

ZH = {
    "names": ["李明", "王芳", "张伟", "刘洋", "陈静", "赵磊", "孙悦", "周婷", "吴昊", "郑爽"],
    "cities": ["杭州", "上海", "北京", "深圳", "成都", "南京", "武汉", "西安"],
    "jobs": ["后端开发工程师", "产品经理", "护士", "中学老师", "数据分析师", "设计师", "土木工程师",
             "会计", "厨师", "生物专业的博士生"],
    "hobbies": ["羽毛球", "攀岩", "越野跑", "弹钢琴", "烤面包", "观鸟", "下围棋", "种花", "摄影", "游泳"],
    "foods": ["素食", "川菜", "日料", "手工面", "泰国菜"],
    "places": ["京都", "北京", "广州", "厦门", "大理", "青岛", "三亚"],
    "weekdays": ["周一", "周二", "周三", "周四", "周五", "周六"],
    "family": ["我女儿", "我儿子", "我老婆", "我老公", "我爸妈", "我姐姐"],
    "facts": [
        "我叫{name}，今年{age}岁，在{city}做{job}。",
        "我周末一般会去打{hobby}，通常是周六上午。",
        "{family}和我刚搬到{city}江边的一套房子里。",
        "上个月我把咖啡换成了绿茶，因为睡眠一直不好。",
        "我三周前刚开始一份新工作，做{job}。",
        "我养了一只金毛，叫饼干，每天要遛两次。",
        "{family}九月份要上新学校了，所以早上特别忙。",
        "我对花生过敏，买东西都会看配料表。",
        "我用手机学西班牙语已经半年了。",
        "我每天上班前跑五公里，用手表记录。",
    ],
    "plans": [
        "我下{weekday}要飞{place}开会，住四个晚上。",
        "我们打算今年夏天和{family}一起去{place}旅游。",
        "我的绩效评估在{day}号，需要准备一份项目总结。",
        "我约了下{weekday}早上九点看牙医。",
        "我想报名十月份的半程马拉松。",
        "{weekday}我要和{city}的客户开电话会，谈新合同。",
    ],
    "prefs": [
        "回复请简短一点，我不喜欢太长的解释。",
        "我喜欢靠窗的座位和早上的航班。",
        "价格请都用人民币告诉我。",
        "我很喜欢{food}，有机会就推荐这个。",
        "文档请用 Markdown，代码块要有语法高亮。",
        "酒店不要推荐一晚超过五百块的。",
        "五个小时以内的行程我更愿意坐高铁，不想坐飞机。",
    ],
    "choices": [
        "还是选素食的那个吧。",
        "还是订离市中心远一点的安静酒店，和上次一样。",
        "不去博物馆了，我更想在老城里随便走走。",
        "短一点的版本更好，谢谢。",
        "还是帮我订最早的那班高铁。",
    ],
    "asks": [
        "你能帮我安排一下接下来几天吗？",
        "你觉得这件事我应该怎么处理？",
        "能帮我列一个简单的清单吗？",
        "今晚吃什么有建议吗？",
        "这周的工作怎么分配比较好？",
    ],
    "replies": [
        "好的，根据你说的情况，这是一个安排。",
        "记下了，我会注意的。",
        "这个想法不错，有几点建议：",
        "谢谢告诉我，这里有个建议。",
        "明白了，我来整理一下。",
    ],
    "filler": [
        "先处理有固定日期的事情，灵活的事情放到下午。",
        "如果天气不好，车站旁边的室内市场是个不错的备选，早上八点开门。",
        "午饭后留出一个小时，第一周的会议经常会超时。",
        "有个简单的方法：打开邮箱之前，先写下今天必须完成的三件事。",
        "坐飞机的话，前一天在网上值机，把登机牌存在手机里。",
        "老城不大，大部分景点步行二十分钟以内都能到。",
        "准备一页总结：目标、完成了什么、什么延期了以及原因、下个季度的计划。",
        "按区域把要办的事情集中起来，这样只需要穿过城市一次。",
        "晚饭吃清淡一点，蔬菜配米饭，不会影响睡眠。",
        "在截止日期前一周设个提醒，这样不会把事情都留到最后一晚。",
        "高铁门到门的时间稍长一些，但路上大部分时间都可以工作。",
        "每次跑完步拉伸十分钟，第二天早上会轻松很多。",
        "把发票都放在一个文件夹里，报销只要五分钟。",
        "如果客户问时间安排，给一个范围而不是一个具体日期。",
    ],
    "notes": "这是我这周的笔记，你能帮我整理一下吗？",
}


class Counter:
    def __init__(self, tokenizer_dir):
        self.tok = None
        path = os.path.join(tokenizer_dir, "tokenizer.json")
        try:
            from tokenizers import Tokenizer  # type: ignore

            if os.path.exists(path):
                self.tok = Tokenizer.from_file(path)
        except ImportError:
            pass
        self.name = "qwen3 tokenizer.json" if self.tok else "estimate"

    def count(self, text, lang):
        if self.tok:
            return len(self.tok.encode(text, add_special_tokens=False).ids)
        if lang == "zh":
            return int(len(text) * 0.7) + 1
        return int(len(text.split()) * 1.3) + 1


def persona(rng, pool):
    """Who the user is: fixed for a whole dialogue, so that its facts agree with each other."""
    return {
        "name": rng.choice(pool["names"]), "age": rng.randint(19, 64), "job": rng.choice(pool["jobs"]),
        "city": rng.choice(pool["cities"]), "hobby": rng.choice(pool["hobbies"]),
        "food": rng.choice(pool["foods"]), "family": rng.choice(pool["family"]),
    }


def fill(rng, pool, who, template):
    return template.format(
        place=rng.choice(pool["places"]), weekday=rng.choice(pool["weekdays"]), day=rng.randint(3, 28),
        family_cap=who["family"][:1].upper() + who["family"][1:], **who,
    )


def paragraph(rng, pool, n, lang):
    sep = "" if lang == "zh" else " "
    return sep.join(rng.choice(pool["filler"]) for _ in range(n))


def user_turn(rng, pool, who, turn, lang):
    sep = "" if lang == "zh" else " "
    parts = []
    if turn == 0:
        parts.append(fill(rng, pool, who, pool["facts"][0]))
    kinds = rng.sample(["facts", "plans", "prefs", "choices"], k=rng.randint(1, 2))
    for k in kinds:
        parts.append(fill(rng, pool, who, rng.choice(pool[k])))
    parts.append(rng.choice(pool["asks"]))
    return sep.join(parts)


def dialogue(rng, pool, lang, target, counter):
    """Add turns (user, assistant) until the contents reach `target` tokens; long dialogues get
    long assistant answers and pasted notes, as real ones do."""
    msgs = []
    total = 0
    turn = 0
    long_form = target >= 1000
    day = rng.randint(1, 27)
    who = persona(rng, pool)
    while True:
        user = user_turn(rng, pool, who, turn, lang)
        if long_form and rng.random() < 0.3:
            user = pool["notes"] + "\n\n" + paragraph(rng, pool, rng.randint(6, 14), lang) + "\n\n" + user
        assistant = rng.choice(pool["replies"])
        n_filler = rng.randint(4, 12) if long_form else rng.randint(0, 2)
        if n_filler:
            assistant += ("" if lang == "zh" else " ") + paragraph(rng, pool, n_filler, lang)
        new = [
            {"role": "user", "content": user, "chat_time": f"2025-06-{day:02d} {9 + turn % 10:02d}:{rng.randint(0, 59):02d}"},
            {"role": "assistant", "content": assistant},
        ]
        cost = sum(counter.count(m["content"], lang) for m in new) + 2  # joined with newlines
        if msgs and total + cost > target * 1.05:
            # The last user turn may end the dialogue without an answer.
            if total + cost - counter.count(assistant, lang) <= target * 1.05:
                msgs.append(new[0])
                total += cost - counter.count(assistant, lang)
            break
        msgs.extend(new)
        total += cost
        turn += 1
        if total >= target * 0.95:
            break
    if rng.random() < 0.3:
        sysmsg = "Extract key memories from the dialogue." if lang == "en" else "请从对话中提取关键记忆。"
        msgs.insert(0, {"role": "system", "content": sysmsg})
    joined = "\n".join(m["content"] for m in msgs)
    return msgs, counter.count(joined, lang)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, ".cache", "models", "qwen3-tokenizer"))
    ap.add_argument("--out", default=os.path.join(ROOT, "loadtest", "corpus"))
    args = ap.parse_args()
    counter = Counter(args.tokenizer)
    os.makedirs(args.out, exist_ok=True)
    for lang, pool in (("en", EN), ("zh", ZH)):
        rng = random.Random(f"{SEED}-{lang}")
        items = []
        for target, count in SIZES:
            for i in range(count):
                msgs, tokens = dialogue(rng, pool, lang, target, counter)
                items.append({
                    "id": f"{lang}-{target}-{i}",
                    "lang": lang,
                    "size": target,
                    "tokens": tokens,
                    "user_turns": sum(1 for m in msgs if m["role"] == "user"),
                    "messages": msgs,
                })
        doc = {"counted_with": counter.name, "dialogues": items}
        path = os.path.join(args.out, f"{lang}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
        sizes = ", ".join(f"{d['id']}={d['tokens']}" for d in items)
        print(f"{path}: {len(items)} dialogues ({counter.name}): {sizes}")


if __name__ == "__main__":
    main()
